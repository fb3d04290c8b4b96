"""Do the demo's checkpoints meet the issue's targets? Scored on a held-out split large enough to tell.

    python benchmarks/targets.py --world runs/long/world --per-task 1000 \
        --models seed0=runs/long/p5/final [NAME=DIR ...] [--out NAME]

The world's own test split has 200 questions a task, so an accuracy near 0.9 carries a standard error of
0.02 (0.027 on the 120-odd numbers among the OCR questions): 0.893 and 0.9 cannot be told apart. This draws
the world's test streams on to `--per-task` questions (`ovis25.synth.build_heldout`, written once beside the
world as heldout<N>/; its first items are the world's own test split, also scored apart), answers them
greedily, thinking off, at the budgets the recipes train with, and scores each target with its standard
error. "met" is the point estimate at or above the target; "clearly" when the whole 95% interval is.
Grounding's accuracy is the share of boxes at IoU >= 0.5, with the mean IoU beside it. A held-out split built
before a task joined the targets is drawn again with it (the same streams: the same items).

Prints a table and writes benchmarks/results/NAME.json (default targets).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ovis25.chat import Chat
from ovis25.demo import ANSWER_TOKENS, BUDGETS
from ovis25.eval import evaluate, is_hit, load_items
from ovis25.synth.build import build_heldout, split_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the targets: name -> (task, category prefix or "" for the whole task, threshold); grounding's is the
# share of boxes at IoU >= 0.5 (`ovis25 eval`'s accuracy), its mean IoU reported beside it
TARGETS = {"count": ("count", "", 0.9), "attribute": ("attribute", "", 0.9), "OCR digits": ("ocr", "number", 0.9),
           "chart": ("chart", "", 0.7), "grounding": ("grounding", "", 0.5)}


def item_index(item_id: str) -> int:
    return int(item_id.rsplit("-", 1)[1])


def score_target(rows: list[dict], task: str, prefix: str, threshold: float, own: int) -> dict:
    """Accuracy on a target's items with its standard error, and on the first `own` items of the task (the
    world's own test split)."""
    scored = [r for r in rows if r["task"] == task and r.get("category", "").startswith(prefix)]
    hits = [is_hit(r) for r in scored]
    first = [is_hit(r) for r in scored if item_index(r["id"]) < own]
    if not hits:
        raise SystemExit(f"no held-out items for task {task!r}: build the split with it")
    p = sum(hits) / len(hits)
    se = math.sqrt(p * (1 - p) / len(hits))
    iou = {"mean_iou": sum(r["score"] for r in scored) / len(scored)} if scored[0]["metric"] == "iou" else {}
    return {"accuracy": p, "n": len(hits), "se": se, "target": threshold, "met": p >= threshold,
            "clearly": p - 1.96 * se >= threshold, "clearly_short": p + 1.96 * se < threshold,
            "world_test": sum(first) / len(first) if first else None, "world_test_n": len(first), **iou}


def verdict(s: dict) -> str:
    return "clearly met" if s["clearly"] else "met" if s["met"] else "clearly short" if s["clearly_short"] else "short"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, type=Path)
    ap.add_argument("--per-task", type=int, default=1000)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=MODEL_DIR ...")
    ap.add_argument("--out", default="targets")
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    tasks = list(dict.fromkeys(task for task, _, _ in TARGETS.values()))
    heldout = args.world.parent / f"heldout{args.per_task}"
    built = json.loads((heldout / "heldout.json").read_text())["tasks"] if (heldout / "heldout.json").exists() else []
    if not set(tasks) <= set(built):  # drawn again with every task: the same streams, so the same items
        build_heldout(args.world, heldout, args.per_task, tasks, progress=True)
    sizes = json.loads((args.world / "world.json").read_text())["sizes"]
    items = [it for it in load_items(heldout / "test.jsonl", heldout / "images") if it.task in tasks]
    results = {}
    for name, model_dir in models.items():
        chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
        _, rows = evaluate(chat, items, False, max_new_tokens=ANSWER_TOKENS[False], budgets=BUDGETS)
        results[name] = {"model": model_dir, **{t: score_target(rows, *spec, split_size(sizes, "test", spec[0]))
                                                for t, spec in TARGETS.items()}}
        print(f"{name}: " + ", ".join(f"{t} {s['accuracy']:.3f}" for t, s in results[name].items() if t != "model"),
              flush=True)

    header = "| model | " + " | ".join(f"{t} >= {spec[2]}" for t, spec in TARGETS.items()) + " |"
    lines = [header, "|---" * (len(TARGETS) + 1) + "|"]
    for name, res in results.items():
        cells = [f"{res[t]['accuracy']:.3f} +- {res[t]['se']:.3f} (n {res[t]['n']}; the world's "
                 f"{res[t]['world_test_n']}: {res[t]['world_test']:.3f}"
                 + (f"; mean IoU {res[t]['mean_iou']:.3f}" if "mean_iou" in res[t] else "")
                 + f") {verdict(res[t])}" for t in TARGETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({"command": "python benchmarks/targets.py " + " ".join(argv or sys.argv[1:]),
                               "machine": machine(), "heldout": json.loads((heldout / "heldout.json").read_text()),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
