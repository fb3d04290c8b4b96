"""Does the named-object look-up carry into grounding? Boxes learned from checkpoints with and without it.

    python benchmarks/grounding_lookup.py --models p2c=runs/long/p2c/final p1=runs/long/p1/final \
        [--questions 60000] [--test 1000] [--seed 0] [--work runs/grounding_lookup] [--out NAME]

A world of `--questions` grounding questions on the demo's scenes (2-4 objects; the run's seed, so its test
questions begin with the demo world's), then from each checkpoint one pass of `recipes/long/lookup.toml` over
them (as the long preset's look-up phases train), then greedy boxes for `--test` held-out questions. Each box is
scored as `ovis25 eval` scores it (a hit at IoU >= 0.5, and the mean IoU) and by the object it fits: the one
named, or another object of the image. A model that ignores the name fits another object about as often as the
one named; one that follows it, rarely. Trained models are kept under `--work` and reused.

Prints a table and writes benchmarks/results/NAME.json (default grounding_lookup).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ovis25.chat import Chat
from ovis25.demo import ANSWER_TOKENS, BUDGETS
from ovis25.eval import evaluate, load_items, summarize
from ovis25.grounding import Box, format_box, parse_boxes
from ovis25.synth.build import DRAWS, task_rng
from ovis25.synth.world import Obj

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, one_task_world, table, train_lookup  # noqa: E402


def held_out_objects(seed: int, n: int, answers: list[str]) -> list[list[Box]]:
    """The boxes of every object of the first `n` test scenes, the named one first, as answers write them (three
    decimals), drawn again from the test stream; `answers` (the world's) must match what it draws."""
    rng, out = task_rng(seed, "test", "grounding"), []
    for i in range(n):
        sample = DRAWS["grounding"](rng)
        if sample.answer != answers[i]:
            raise RuntimeError(f"test item {i}: the stream drew {sample.answer}, the world holds {answers[i]}")
        size = sample.images[0].size
        out.append([parse_boxes(format_box(Obj.from_dict(o).rel_box(*size)))[0] for o in sample.meta["objects"]])
    return out


def fits(rows: list[dict], objects: list[list[Box]]) -> dict:
    """The share of boxes at IoU >= 0.5 with the named object and with another object of the image."""
    named = other = 0
    for row, boxes in zip(rows, objects):
        found = parse_boxes(row["response"])
        if found:
            named += found[0].iou(boxes[0]) >= 0.5
            other += max(found[0].iou(b) for b in boxes[1:]) >= 0.5
    return {"named": named / len(rows), "another": other / len(rows)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=CHECKPOINT to start from ...")
    ap.add_argument("--questions", type=int, default=60000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "grounding_lookup")
    ap.add_argument("--out", default="grounding_lookup")
    args = ap.parse_args(argv)
    world = one_task_world(args.work / "world", "grounding", args.questions, args.test, args.seed)
    items = load_items(world / "test.jsonl", world / "images")
    objects = held_out_objects(args.seed, len(items), [it.answer for it in items])
    results = {}
    for name, init in dict(m.split("=", 1) for m in args.models).items():
        model = train_lookup(init, args.work / name, world, ["synth_qa_grounding"], args.seed)
        chat = Chat.from_pretrained(model, dtype=torch.float32)
        _, rows = evaluate(chat, items, False, max_new_tokens=ANSWER_TOKENS[False], budgets=BUDGETS)
        summary = summarize(rows, False)["grounding"]
        results[name] = {"init": init, "hit": summary["accuracy"], "mean_iou": summary["mean_iou"],
                         "categories": summary["categories"], **fits(rows, objects)}
        print(f"{name}: hit {summary['accuracy']:.3f}, mean IoU {summary['mean_iou']:.3f}", flush=True)
    print(table([{"from": k, **v} for k, v in results.items()],
                {"from": "from", "hit": "IoU >= 0.5", "mean_iou": "mean IoU", "named": "fits the named object",
                 "another": "fits another object"}))
    path = RESULTS / f"{args.out}.json"
    path.write_text(json.dumps({"command": "python benchmarks/grounding_lookup.py " + " ".join(argv or sys.argv[1:]),
                                "machine": machine(), "questions": args.questions, "test": len(items),
                                "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
