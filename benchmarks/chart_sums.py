"""Do sums written in text teach the model to add two bars of a chart?

    python benchmarks/chart_sums.py --init runs/long_sp5/p2/final [--questions 20000] [--sums 20000] [--test 600]
                                    [--seed 0] [--work runs/chart_sums] [--out NAME]

The demo's model answers "What is A plus B?" about a chart with a near miss (DEMO.md, "Where chart stops short"),
and its LLM cannot add from a caption either. From `--init`, one pass of `recipes/long/lookup.toml` (the P2
settings) over `--questions` chart questions, alone ("charts") and with `--sums` text-only sums mixed in
("charts + sums"): half a chart's caption in place of its image ("a bar chart: A is 7, B is 2, C is 3\\nWhat is A
plus C?" -> "10"), half the bare sum ("What is 7 plus 3?"). Both are scored on `--test` held-out chart
questions by kind (which bar is highest, a bar's value, a sum), and on text sums of fresh captions.
Trained models are kept under `--work` and reused.

Prints a table and writes benchmarks/results/NAME.json (default chart_sums).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ovis25.chat import Chat
from ovis25.demo import ANSWER_TOKENS, BUDGETS
from ovis25.eval import EvalItem, evaluate, load_items, summarize
from ovis25.synth.build import task_rng
from ovis25.synth.world import TASKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, one_task_world, table, train_lookup  # noqa: E402


def text_sums(seed: int, split: str, n: int) -> list[tuple[str, str]]:
    """`n` (question, answer) sums in text: every other one a fresh chart's caption and its sum question, the
    others the bare sum of its two values."""
    rng, out = task_rng(seed, f"sums-{split}", "chart"), []
    while len(out) < n:
        sample = TASKS["chart"](rng)
        if sample.meta["kind"] != "sum":
            continue
        if len(out) % 2:
            values = dict(zip(sample.meta["labels"], sample.meta["values"]))
            p, q = sample.question.removeprefix("What is ").removesuffix("?").split(" plus ")
            out.append((f"What is {values[p]} plus {values[q]}?", sample.answer))
        else:
            out.append((f"{sample.caption}\n{sample.question}", sample.answer))
    return out


def add_sums_dataset(world: Path, seed: int, n: int) -> None:
    """`synth_text_sums` in the world's datainfo: `n` text-only sums."""
    info = json.loads((world / "datainfo.json").read_text())
    rows = [{"id": f"sum-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(text_sums(seed, "train", n))]
    (world / "meta" / "text_sums.json").write_text(json.dumps(rows))
    info["synth_text_sums"] = {"meta_file": "meta/text_sums.json", "image_dir": "images", "data_format": "conversation"}
    (world / "datainfo.json").write_text(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, type=Path)
    ap.add_argument("--questions", type=int, default=20000)
    ap.add_argument("--sums", type=int, default=20000)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "chart_sums")
    ap.add_argument("--out", default="chart_sums")
    args = ap.parse_args(argv)
    world = one_task_world(args.work / "world", "chart", args.questions, args.test, args.seed)
    add_sums_dataset(world, args.seed, args.sums)
    charts = load_items(world / "test.jsonl", world / "images")
    sums = [EvalItem(f"sum-{i}", "text sum", [{"from": "human", "value": q}], [], None, a, "number")
            for i, (q, a) in enumerate(text_sums(args.seed, "test", 200))]
    variants = {"before": None, "charts": ["synth_qa_chart"], "charts + sums": ["synth_qa_chart", "synth_text_sums"]}
    results = {}
    for name, datasets in variants.items():
        model = train_lookup(args.init, args.work / name.replace(" + ", "_"), world, datasets, args.seed) \
            if datasets else args.init
        chat = Chat.from_pretrained(model, dtype=torch.float32)
        chart = summarize(evaluate(chat, charts, False, ANSWER_TOKENS[False], budgets=BUDGETS)[1], False)["chart"]
        text = summarize(evaluate(chat, sums, False, ANSWER_TOKENS[False])[1], False)["text sum"]
        results[name] = {"model": str(model), "chart": chart["accuracy"], "text sums": text["accuracy"],
                         **{k: v["accuracy"] for k, v in chart["categories"].items()}}
        print(f"{name}: chart {chart['accuracy']:.3f}, text sums {text['accuracy']:.3f}", flush=True)
    columns = ["chart", *sorted(k for k in results["before"] if k not in ("model", "chart", "text sums")), "text sums"]
    print(table([{"variant": k, **v} for k, v in results.items()], ["variant", *columns]))
    path = RESULTS / f"{args.out}.json"
    path.write_text(json.dumps({"command": "python benchmarks/chart_sums.py " + " ".join(argv or sys.argv[1:]),
                                "machine": machine(), "questions": args.questions, "sums": args.sums,
                                "test": len(charts), "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
