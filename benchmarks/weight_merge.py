"""How much of a phase's drift to keep: the demo's P4 (or P5) weights mixed with the weights it started from.

    python benchmarks/weight_merge.py [--run runs/demo] [--phase p4] [--shares 1,0.7,0.5,0] [--limit 200]
                                      [--out NAME]

Trains the phase again from the run's previous checkpoint with its recipe, but exporting the trained weights
as they are (`merge_with_init = 0`), then scores every mix `share * start + (1 - share) * trained`: share 1 is
the starting checkpoint, 0 the trained weights, 0.5 what the tiny recipes export. Each mix answers `--limit`
test questions per task greedily with thinking off and on, and (P4) the demo's held-out preference pairs;
every score is paired item by item against the trained weights (`ovis25.eval.paired_gain`). Prints a table
and writes benchmarks/results/NAME.json (NAME: weight_merge_<phase> unless --out says).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ovis25.chat import Chat
from ovis25.demo import ANSWER_TOKENS, BUDGETS, RECIPES, TRAIN_PHASES, preference_datasets
from ovis25.eval import evaluate, is_hit, load_items, paired_gain, pairs_by_kind, preference_accuracy
from ovis25.train import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def retrain(run: Path, phase: str, out: Path, seed: int, overrides: list[str] = ()) -> tuple[Path, Path]:
    """The phase trained from the run's previous checkpoint (recipe `key=value` overrides as the run had them),
    exported unmerged -> (start, trained) dirs."""
    start = run / TRAIN_PHASES[TRAIN_PHASES.index(phase) - 1] / "final"
    if not (start / "config.json").exists():
        raise SystemExit(f"{start}: no checkpoint (config.json); run `make demo` first or pass --run")
    trained = out / "final"
    if not (trained / "config.json").exists():
        train(load_recipe(RECIPES / f"{phase}.toml", [f'init="{start}"', f'out_dir="{out}"', f"seed={seed}",
                                                      f'datainfo="{run / "world" / "datainfo.json"}"',
                                                      *overrides, "merge_with_init=0"]))
    return start, trained


def mixed(start: dict[str, torch.Tensor], trained: Path, share: float) -> Chat:
    """A Chat whose weights are share * start's + (1 - share) * trained's (tied tensors mixed once)."""
    chat = Chat.from_pretrained(trained, dtype=torch.float32)
    with torch.no_grad():
        for name, p in chat.model.named_parameters():
            p.lerp_(start[name], share)
    return chat


def score(chat: Chat, items: list, pairs: list[dict] | None, images: Path) -> dict:
    """Per-item hits with thinking off and on, and (given pairs) the preference wins."""
    out = {}
    for thinking in (False, True):
        _, rows = evaluate(chat, items, thinking, max_new_tokens=ANSWER_TOKENS[thinking], batch_size=64, budgets=BUDGETS)
        out["thinking on" if thinking else "thinking off"] = [is_hit(r) for r in rows]
    if pairs:
        pref = preference_accuracy(chat.model, chat.processor, pairs, images, BUDGETS)
        out["pairs"], out["kinds"] = pref["wins"], pref["kinds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs/demo")
    ap.add_argument("--phase", default="p4", choices=["p4", "p5"])
    ap.add_argument("--shares", default="1,0.7,0.5,0", help="shares of the starting weights to score")
    ap.add_argument("--limit", type=int, default=200, help="test questions per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shares = list(dict.fromkeys([float(s) for s in args.shares.split(",")] + [0.0]))  # 0: the baseline
    if not all(0 <= s <= 1 for s in shares):
        raise SystemExit(f"--shares: each share must be in [0, 1], got {args.shares}")
    world = args.run / "world"
    start_dir, trained_dir = retrain(args.run, args.phase, ROOT / "runs" / f"weight_merge_{args.phase}", args.seed)
    items = load_items(world / "test.jsonl", world / "images", args.limit)
    pairs = preference_datasets(world) if args.phase == "p4" else None
    start = dict(Chat.from_pretrained(start_dir, dtype=torch.float32).model.named_parameters())
    scores = {share: score(mixed(start, trained_dir, share), items, pairs, world / "images") for share in shares}
    base = scores[0.0]

    def cell(before: list[float], after: list[float]) -> dict:
        return {"accuracy": round(sum(after) / len(after), 4),
                "vs_trained": [round(x, 4) for x in paired_gain(before, after)]}

    summary = {}
    for share, s in scores.items():
        row = {mode: cell(base[mode], s[mode]) for mode in ("thinking off", "thinking on")}
        for kind, idx in (pairs_by_kind(s["kinds"]).items() if pairs else ()):
            row[f"pairs: {kind}"] = cell([base["pairs"][i] for i in idx], [s["pairs"][i] for i in idx])
        summary[str(share)] = row
    columns = list(next(iter(summary.values())))
    print(f"\n{args.phase} of {args.run}: share of the starting weights; each score, then its change against the "
          f"trained weights (95% interval)\n| share | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for share, row in summary.items():
        cells = [f"{v['accuracy']:.3f} ({v['vs_trained'][0]:+.3f} +- {v['vs_trained'][1]:.3f})" for v in row.values()]
        print(f"| {share} | " + " | ".join(cells) + " |")
    result = {"run": str(args.run), "phase": args.phase, "questions_per_task": args.limit, "shares": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.out or f"weight_merge_{args.phase}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
