"""The short version of benchmarks/load.py: 24 requests from 4 client threads in 2 rounds against a real
`ovis25 serve` subprocess, mixed text/image, streamed and cancelled mid-stream; every completed answer equals
the one-by-one greedy answer, cancelled requests are aborted, RSS is stable, the server answers afterwards."""
import sys

from conftest import REPO, model_dir, requires_fixtures

sys.path.insert(0, str(REPO / "benchmarks"))
import load  # noqa: E402  (benchmarks/ is not a package)

pytestmark = requires_fixtures


def test_short_load():
    report = load.run_load(model_dir(), requests=24, concurrency=4, rounds=2)
    assert report.problems == []
    assert report.counts == {"plain": 14, "stream": 7, "cancelled": 3}  # the schedule: all 24 went through
    assert [row["completed"] + row["cancelled"] for row in report.rows] == [12, 12, 24]
    assert report.rows[-1]["p50_s"] <= report.rows[-1]["p99_s"]
