"""What DPO teaches the demo's tiny Ovis, by kind of preference pair, against SFT on the same chosen responses.

    python benchmarks/dpo_pairs.py [--run runs/demo] [--pairs 1000] [--held 150] [--variants dpo,sft]

From the demo's P3 (`RUN/p3/final`), each variant trains the P4 recipe (recipes/tiny/p4.toml) on a fresh
world of `--pairs` preference pairs per task, then scores preference accuracy (the chosen response more
likely than the rejected one, per token, as the demo does) on `--held` fresh pairs per task from another
seed. Variants: `dpo` (the recipe as it is) and `sft` (the recipe's NLL on the chosen response alone, weight
1, DPO's term switched off with a vanishing beta): the control that says whether a gain comes from the
preference or merely from more training on the right responses. Pairs of the kinds in
`ovis25.synth.build.PAIR_KINDS` are reported apart: perception pairs (answer only, misled traces) and
faithfulness pairs (an answer that contradicts its own trace) do not learn alike.

Prints a table and writes benchmarks/results/dpo_pairs.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"dpo": [], "sft": ["dpo_beta=1e-9", "dpo_nll_weight=1.0"]}


def pair_world(path: Path, seed: int, pairs: int) -> list[dict]:
    """A world of preference pairs alone, with a datainfo entry `synth_dpo` for P4; returns its pairs."""
    from ovis25.synth import build_world
    if not (path / "world.json").exists():
        build_world(path, seed=seed, sizes={"dpo": pairs}, tokenizer=False)
    info = {"synth_dpo": {"meta_file": "dpo.jsonl", "image_dir": "images", "data_format": "conversation"}}
    (path / "datainfo.json").write_text(json.dumps(info, indent=2))
    return [json.loads(line) for line in (path / "dpo.jsonl").read_text().splitlines() if line.strip()]


def score(model_dir: Path, pairs: list[dict], image_dir: Path) -> dict:
    from ovis25.demo import BUDGETS
    from ovis25.eval import preference_accuracy
    from ovis25.model import Ovis
    from ovis25.processing import Processor
    return preference_accuracy(Ovis.from_pretrained(model_dir), Processor.from_pretrained(model_dir), pairs,
                               image_dir, BUDGETS)


def by_kind(base: dict, after: dict) -> dict:
    from ovis25.eval import paired_gain, pairs_by_kind
    out = {}
    for kind, idx in pairs_by_kind(base["kinds"]).items():
        before, now = [base["wins"][i] for i in idx], [after["wins"][i] for i in idx]
        gain, half = paired_gain(before, now)
        out[kind] = {"pairs": len(idx), "before": sum(before) / len(idx), "after": sum(now) / len(idx),
                     "gain": gain, "half_width": half}
    return out


def render(results: dict) -> str:
    lines = [f"preference accuracy on {results['held_pairs']} fresh pairs, P3 -> P4 trained on "
             f"{results['train_pairs']} pairs (95% interval over pairs):", "",
             "| variant | kind | pairs | P3 | P4 | change |", "|---|---|---|---|---|---|"]
    for variant, res in results["variants"].items():
        lines += [f"| {variant} ({res['train_s']:.0f} s) | {kind} | {r['pairs']} | {r['before']:.3f} | {r['after']:.3f} | "
                  f"{r['gain']:+.3f} ± {r['half_width']:.3f} |" for kind, r in res["by_kind"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from ovis25.train import load_recipe, train
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--pairs", type=int, default=1000, help="training pairs per task")
    ap.add_argument("--held", type=int, default=150, help="held-out pairs per task")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "dpo_pairs")
    args = ap.parse_args(argv)
    init = args.run / "p3" / "final"
    if not (init / "config.json").exists():
        sys.exit(f"{init}: no P3 checkpoint; run `make demo` first (or pass --run)")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        sys.exit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    train_world, held_world = args.work / f"train-{args.pairs}", args.work / f"held-{args.held}"
    train_pairs = pair_world(train_world, args.seed + 3, args.pairs)
    held = pair_world(held_world, args.seed + 1, args.held)
    base = score(init, held, held_world / "images")
    results = {"init": str(init), "train_pairs": len(train_pairs), "held_pairs": len(held), "variants": {}}
    for variant in args.variants.split(","):
        out = args.work / variant
        t0 = time.perf_counter()
        train(load_recipe(ROOT / "recipes" / "tiny" / "p4.toml", [
            f'init="{init}"', f'out_dir="{out}"', f'datainfo="{train_world / "datainfo.json"}"', f"seed={args.seed}",
            *VARIANTS[variant]]))
        train_s = time.perf_counter() - t0
        after = score(out / "final", held, held_world / "images")
        results["variants"][variant] = {"train_s": train_s, "by_kind": by_kind(base, after)}
        print(render({**results, "variants": {variant: results["variants"][variant]}}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dpo_pairs.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nwrote {RESULTS / 'dpo_pairs.json'}")


if __name__ == "__main__":
    main()
