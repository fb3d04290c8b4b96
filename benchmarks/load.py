"""Load on loopback: a real `ovis25 serve` subprocess and `--concurrency` client threads (the official
`openai` client) sending `--requests` requests over `--rounds` rounds: text and image questions alternate,
every third request is streamed, every seventh is cancelled by its client after the first tokens.

Checks (a failed one exits with status 1):
  * every completed request's text and finish reason equal the one-by-one greedy answer (Chat.generate in
    this process, one request at a time), streamed or not;
  * no request fails (no 4xx/5xx, no timeout), and after every round the server holds no request (the
    cancelled ones were aborted);
  * memory: the server's RSS after the last round is at most RSS_SLACK_MB above its RSS after the first
    round (round 1 warms up: allocator arenas, thread pools, the shapes of the images);
  * afterwards the server answers /health and a normal request correctly.
Reports throughput (completed requests/s, generated tokens/s) and p50/p99 latency of completed requests,
per round, as a table and in benchmarks/results/load.json.

Run sizes (`run(mode)`, as the other sections): full = 200 requests, 16 concurrent, 4 rounds; quick = 48, 8, 2;
smoke = 24, 4, 2 (the version tests/test_load.py runs).

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/load.py [--mode quick] [--requests N ...]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai
from PIL import Image

from common import RESULTS, machine, pick, table, verdict
from ovis25 import Chat
from ovis25.serve.process import ServerProcess

FIXTURE_MODEL = Path(__file__).resolve().parents[2] / "shared/fixtures/models/tiny-tied"
PIXELS = {"min_pixels": 4096, "max_pixels": 25600}  # small images keep the tiny model's prefill quick
RSS_SLACK_MB = 16.0  # 4 x 50 requests grew it ~6 MB here; 12 x 100 levelled off at +9 MB
SERVER_ARGS = ("--max-batch", "8", "--max-queue", "64", "--max-tokens-limit", "64", "--max-model-len", "1024",
               "--log-level", "warning")


@dataclass
class Variant:
    """One question, as an OpenAI request and as the one-by-one reference answer."""

    messages: list[dict]
    max_tokens: int
    has_image: bool
    text: str = ""  # the reference answer
    finish_reason: str = ""
    tokens: int = 0


@dataclass
class Outcome:
    kind: str  # "plain", "stream" or "cancel"
    seconds: float
    tokens: int = 0
    problem: str | None = None


@dataclass
class LoadReport:
    rows: list[dict] = field(default_factory=list)  # one per round, then "all"
    rss_mb: list[float] = field(default_factory=list)  # server RSS after each round
    problems: list[str] = field(default_factory=list)  # failed checks; empty when all passed
    counts: dict[str, int] = field(default_factory=dict)  # completed / cancelled requests by kind

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_mb[-1] - self.rss_mb[0]


def picture(i: int) -> Image.Image:
    """Deterministic test images of a few sizes and aspect ratios."""
    width, height = [(96, 64), (64, 96), (128, 128), (160, 90)][i % 4]
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * (3 + i)) % 256, (y * (5 + i)) % 256, ((x + y) * 7 * (i + 1)) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_variants(chat: Chat, count: int = 8) -> list[Variant]:
    """Half text, half image questions of different answer lengths, with their one-by-one greedy answers."""
    variants = []
    for i in range(count):
        question, max_tokens = f"Question {i}: what do you see here?", 4 + 3 * i
        if i % 2:
            image = picture(i)
            content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
            reference = [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]}]
        else:
            content, reference = question, [{"role": "user", "content": question}]
        expected = chat.generate(reference, max_new_tokens=max_tokens, **PIXELS)
        variants.append(Variant([{"role": "user", "content": content}], max_tokens, bool(i % 2), expected.text,
                                expected.finish_reason, len(expected.token_ids)))
    return variants


def one_request(client: openai.OpenAI, model: str, variant: Variant, kind: str) -> Outcome:
    """Send one request; check a completed answer against the reference."""
    extra = {"mm_processor_kwargs": {"images_kwargs": PIXELS}}
    t0 = time.perf_counter()
    try:
        if kind == "plain":
            res = client.chat.completions.create(model=model, messages=variant.messages, max_tokens=variant.max_tokens,
                                                 temperature=0, extra_body=extra)
            text, finish = res.choices[0].message.content, res.choices[0].finish_reason
        elif kind == "stream":
            parts, finish = [], None
            for chunk in client.chat.completions.create(model=model, messages=variant.messages, stream=True,
                                                        max_tokens=variant.max_tokens, temperature=0,
                                                        extra_body=extra):
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            text = "".join(parts)
        else:  # a long answer, abandoned after its first tokens
            stream = client.chat.completions.create(model=model, messages=variant.messages, stream=True,
                                                    max_tokens=64, temperature=0,
                                                    extra_body={**extra, "ignore_eos": True})
            chunks = iter(stream)
            next(chunks), next(chunks)
            stream.close()
            return Outcome(kind, time.perf_counter() - t0)
    except Exception as e:  # every failure is a finding: report it, keep the load going
        return Outcome(kind, time.perf_counter() - t0, problem=f"{kind}: {type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if (text, finish) != (variant.text, variant.finish_reason):
        return Outcome(kind, seconds, problem=f"{kind}: got {text!r} ({finish}), expected {variant.text!r} "
                                              f"({variant.finish_reason})")
    return Outcome(kind, seconds, variant.tokens)


def schedule(n: int, offset: int = 0) -> list[tuple[int, str]]:
    """(variant index, kind) of requests offset..offset+n-1: variants alternate text/image, every third
    request is streamed and every seventh cancelled."""
    jobs = []
    for i in range(offset, offset + n):
        kind = "cancel" if i % 7 == 6 else "stream" if i % 3 == 0 else "plain"
        jobs.append((i, kind))
    return jobs


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def round_row(name: str, outcomes: list[Outcome], seconds: float, rss: float | None) -> dict:
    done = [o for o in outcomes if o.kind != "cancel" and o.problem is None]
    latencies = [o.seconds for o in done]
    return {"round": name, "requests": len(outcomes), "completed": len(done),
            "cancelled": sum(o.kind == "cancel" and o.problem is None for o in outcomes),
            "failed": sum(o.problem is not None for o in outcomes), "wall_s": seconds,
            "req_per_s": len(done) / seconds, "tok_per_s": sum(o.tokens for o in done) / seconds,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "rss_mb": rss if rss is not None else ""}


def run_load(model_dir: str | Path = FIXTURE_MODEL, requests: int = 200, concurrency: int = 16, rounds: int = 4,
             server_args: tuple[str, ...] = SERVER_ARGS, server_threads: int = 1) -> LoadReport:
    """Run the load against a fresh server subprocess; returns the measurements and the failed checks."""
    chat = Chat.from_pretrained(model_dir)
    variants = make_variants(chat)
    report = LoadReport()
    env = {"OMP_NUM_THREADS": str(server_threads)}
    with ServerProcess(model_dir, *server_args, env=env) as server:
        model = Path(model_dir).resolve().name  # the server's default model id
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        per_round = [requests // rounds + (r < requests % rounds) for r in range(rounds)]
        everything: list[Outcome] = []
        total_s, offset = 0.0, 0
        for r, n in enumerate(per_round, 1):
            jobs = schedule(n, offset)
            offset += n
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                outcomes = list(pool.map(lambda job: one_request(client, model, variants[job[0] % len(variants)],
                                                                 job[1]), jobs))
            seconds = time.perf_counter() - t0
            try:
                server.wait_idle(30)
            except TimeoutError as e:
                report.problems.append(f"round {r}: {e} (cancelled requests not aborted?)")
            report.rss_mb.append(server.rss_mb())
            report.rows.append(round_row(str(r), outcomes, seconds, report.rss_mb[-1]))
            everything += outcomes
            total_s += seconds
        report.rows.append(round_row("all", everything, total_s, None))
        report.problems += [o.problem for o in everything if o.problem]
        for o in everything:
            key = "cancelled" if o.kind == "cancel" else o.kind
            report.counts[key] = report.counts.get(key, 0) + (o.problem is None)
        if len(report.rss_mb) > 1 and report.rss_growth_mb > RSS_SLACK_MB:
            report.problems.append(f"server RSS grew {report.rss_growth_mb:.1f} MB from round 1 to round {rounds} "
                                   f"(allowed {RSS_SLACK_MB:g} MB): {report.rss_mb}")
        health = server.health()
        if health != {"status": "ok", "requests": 0}:
            report.problems.append(f"after the load /health says {health}")
        after = one_request(client, model, variants[1], "plain")
        if after.problem:
            report.problems.append(f"a normal request after the load failed: {after.problem}")
    return report


COLUMNS = ["round", "requests", "completed", "cancelled", "failed", "wall_s", "req_per_s", "tok_per_s", "p50_s",
           "p99_s", "rss_mb"]


def run(mode: str, **overrides) -> dict:
    """The section interface: measurements and checks for this run size."""
    config = {"requests": pick(mode, 200, 48, 24), "concurrency": pick(mode, 16, 8, 4), "rounds": pick(mode, 4, 2, 2),
              "server_threads": 1, **overrides}
    report = run_load(requests=config["requests"], concurrency=config["concurrency"], rounds=config["rounds"],
                      server_threads=config["server_threads"])
    return {"config": {**config, "server_args": list(SERVER_ARGS), "rss_slack_mb": RSS_SLACK_MB},
            "rows": report.rows, "rss_mb": report.rss_mb, "rss_growth_mb": report.rss_growth_mb,
            "counts": report.counts, "problems": report.problems}


def render(result: dict) -> str:
    c = result["config"]
    return "\n".join([
        table(result["rows"], COLUMNS), "",
        f"{c['requests']} requests from {c['concurrency']} client threads in {c['rounds']} rounds; completed by kind: "
        f"{result['counts']}. Server RSS after each round (MB): {[round(x, 1) for x in result['rss_mb']]}.",
        verdict(not result["problems"], "every completed answer equals the one-by-one greedy answer, no request "
                f"fails, cancelled requests are aborted, RSS grows at most {c['rss_slack_mb']:g} MB after round 1, "
                "the server answers afterwards", "; ".join(result["problems"][:5]))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["full", "quick", "smoke"], default="full")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--server-threads", type=int, help="torch threads of the server process (default 1)")
    args = ap.parse_args()
    overrides = {k: v for k, v in vars(args).items() if k != "mode" and v is not None}
    result = run(args.mode, **overrides)
    print(render(result))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "load.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    if result["problems"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
