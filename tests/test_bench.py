"""Smoke test of the benchmark suite: every section runs at a minimal size and renders, and BENCHMARKS.md is
generated from the template with every section filled in. No timings are checked."""
import sys
import time

import pytest

from conftest import REPO, requires_fixtures

sys.path.insert(0, str(REPO / "benchmarks"))
import run as bench  # noqa: E402  (benchmarks/run.py)

pytestmark = requires_fixtures


@pytest.fixture(scope="module")
def results(single_thread):
    out = {"machine": {**bench.machine(), "date": "2000-01-01"}, "mode": "smoke", "sections": {}}
    limits = None
    for name in bench.SECTIONS:
        module = __import__(name)
        kwargs = {"limits": limits} if name in ("llm", "train") else {}
        t0 = time.perf_counter()
        out["sections"][name] = module.run("smoke", **kwargs) | {"seconds": time.perf_counter() - t0}
        limits = limits or out["sections"][name]
    return out


@pytest.mark.parametrize("name", bench.SECTIONS)
def test_section_runs_and_renders(results, name):
    result = results["sections"][name]
    assert "error" not in result
    text = bench.render_section(name, result)
    assert text.strip() and "|---|" in text  # at least one table


def test_docs_are_generated_from_the_template(results):
    docs = bench.render_docs(results, bench.TEMPLATE.read_text())
    assert "{{" not in docs and "This section failed" not in docs
    for name in bench.SECTIONS:
        assert f"`benchmarks/{name}.py`" in docs  # every section has its heading in the template


def test_failed_section_is_reported_not_raised():
    results = {"machine": {**bench.machine()}, "mode": "quick",
               "sections": {"machine": {"error": "Traceback ...\nRuntimeError: boom", "seconds": 0.0}}}
    docs = bench.render_docs(results, "{{header}}\n{{section:machine}}\n{{section:llm}}")
    assert "RuntimeError: boom" in docs and "Not run" in docs
