"""Can the demo's LLM answer from the caption in its context? A text-only ceiling for each captioned task.

    python benchmarks/context_reading.py [MODEL_DIR ...] [--questions 100] [--out NAME]

MODEL_DIR defaults to `runs/demo/p0/final` (the LLM after language pretraining, before it sees an image).
Each question is a fresh scene's caption where the image would be, then its question ("a bar chart: A is 7,
B is 2, C is 3\\nWhat is A plus C?"), answered greedily with thinking off and on and scored as
`ovis25 eval` scores it. The caption says everything the image shows that the question needs (spatial and
grounding only roughly: it places objects in thirds of the image), so this measures the reasoning the LLM
brings to P2: what it cannot do from the caption, P2 has to teach it along with reading the image.
Scores are split by the kind of question where a task has kinds (chart: value / highest / sum; OCR: number
/ word). Prints a table and writes benchmarks/results/NAME.json (NAME: context_reading unless --out says).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from ovis25.chat import Chat
from ovis25.demo import ANSWER_TOKENS
from ovis25.eval import EvalItem, evaluate, is_hit
from ovis25.synth.build import CAPTIONED, task_rng
from ovis25.synth.world import TASKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def questions(n: int, seed: int) -> tuple[list[EvalItem], list[str]]:
    """`n` captioned questions per task from their own stream, and each one's kind (the task when it has none)."""
    items, kinds = [], []
    for task in CAPTIONED:
        rng = task_rng(seed, "context-reading", task)
        for i in range(n):
            s = TASKS[task](rng)
            prompt = [{"from": "human", "value": f"{s.caption}\n{s.question}"}]
            items.append(EvalItem(f"{task}-{i}", task, prompt, [], None, s.answer, s.metric))
            kinds.append(f"{task}: {s.meta['kind']}" if "kind" in s.meta else task)
    return items, kinds


def score(model_dir: Path, items: list[EvalItem], kinds: list[str]) -> dict:
    """{"thinking off" / "thinking on": {task or "task: kind": accuracy}, "n": {the same keys: questions}}."""
    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for thinking in (False, True):
        _, rows = evaluate(chat, items, thinking, max_new_tokens=ANSWER_TOKENS[thinking], batch_size=64)
        hits: dict[str, list[float]] = defaultdict(list)
        for row, kind in zip(rows, kinds):
            for key in dict.fromkeys((row["task"], kind)):  # the task, and its kind where it has kinds
                hits[key].append(is_hit(row))
        out["thinking on" if thinking else "thinking off"] = {k: round(sum(v) / len(v), 3) for k, v in hits.items()}
    out["n"] = {k: len(v) for k, v in hits.items()}  # the same questions in both modes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", type=Path, default=[ROOT / "runs/demo/p0/final"])
    ap.add_argument("--questions", type=int, default=100, help="per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="context_reading")
    args = ap.parse_args()
    items, kinds = questions(args.questions, args.seed)
    results = {"questions_per_task": args.questions, "seed": args.seed, "models": {}}
    for model in args.models:
        if not (model / "config.json").exists():
            raise SystemExit(f"{model}: no checkpoint (config.json); run `make demo` first or pass a model dir")
        results["models"][str(model)] = score(model, items, kinds)
    for model, res in results["models"].items():
        print(f"\n{model}\n| question | n | thinking off | thinking on |\n|---|---|---|---|")
        for k in res["thinking off"]:
            print(f"| {k} | {res['n'][k]} | {res['thinking off'][k]:.2f} | {res['thinking on'][k]:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS / f'{args.out}.json'}")


if __name__ == "__main__":
    main()
