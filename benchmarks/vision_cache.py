"""What the frozen-ViT cache (`vision_cache_mb`) saves in the demo's phases that keep the ViT frozen.

    python benchmarks/vision_cache.py [--run runs/demo] [--share 0.1] [--p5-steps 30] [--repeat 1]

Each phase is trained from the run's own checkpoints with its tiny recipe, once with the cache off
(`vision_cache_mb=0`) and once with it on (the default), one after the other so that both see the same load:
- P2 on `--share` of its data, for the same three passes and the same three-quarters of the steps as the demo,
  so that later passes meet images already seen, as in the demo;
- P4 (DPO) as the demo runs it: two passes over its pairs, both responses of a pair showing the same image;
- P5 (GRPO) for `--p5-steps` steps: six rollouts per prompt, each scored with the prompt's image.
Prints a table and writes benchmarks/results/vision_cache.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def phase_overrides(phase: str, share: float, p5_steps: int) -> list[str]:
    if phase == "p2":  # the recipe's steps are 3/4 of three passes over all of P2's data
        return [f'datasets=["synth_qa:{share}", "synth_caption:{share}"]']
    return [f"max_steps={p5_steps}"] if phase == "p5" else []


def steps_of(start: Path, cfg) -> int:
    """Optimizer steps in all the passes over the recipe's data."""
    from ovis25.processing import Processor
    from ovis25.train.data import SampleBuilder, load_datainfo, plan_datasets
    from ovis25.train.trainer import count_steps, pixel_budgets, plan_bins
    builder = SampleBuilder(Processor.from_pretrained(start), pixel_budgets(cfg), cfg.max_tokens)
    planned = plan_datasets(load_datainfo(cfg.datainfo, cfg.datasets), builder, cfg.seed)
    return count_steps(len(plan_bins(planned, cfg)), cfg, 1)


def time_phase(run: Path, phase: str, cache_mb: int, work: Path, overrides: list[str]) -> float:
    from ovis25.demo import RECIPES, TRAIN_PHASES
    from ovis25.train import load_recipe, train
    start = run / TRAIN_PHASES[TRAIN_PHASES.index(phase) - 1] / "final"
    out = work / f"{phase}-{cache_mb}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_recipe(RECIPES / f"{phase}.toml", [
        f'init="{start}"', f'out_dir="{out}"', f'datainfo="{run / "world" / "datainfo.json"}"', "export=false",
        "progress=false", f"vision_cache_mb={cache_mb}", *overrides])
    if phase == "p2":  # on a share of its data, for the share of its passes the recipe runs
        from dataclasses import replace
        full = load_recipe(RECIPES / "p2.toml", [f'init="{start}"', f'datainfo="{run / "world" / "datainfo.json"}"'])
        passes = steps_of(start, replace(cfg, max_steps=None)) / steps_of(start, replace(full, max_steps=None))
        cfg.max_steps = round(full.max_steps * passes)
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def render(results: dict) -> str:
    lines = ["| phase | cache off (s) | cache on (s) | speed-up |", "|---|---|---|---|"]
    for phase, r in results["phases"].items():
        lines.append(f"| {phase} | {r['off_s']:.1f} | {r['on_s']:.1f} | {r['off_s'] / r['on_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--share", type=float, default=0.1, help="share of P2's data")
    ap.add_argument("--p5-steps", type=int, default=30)
    ap.add_argument("--phases", default="p2,p4,p5")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "vision_cache")
    args = ap.parse_args(argv)
    if not (args.run / "p4" / "final" / "config.json").exists():
        sys.exit(f"{args.run}: no P4 checkpoint; run `make demo` first (or pass --run)")
    from ovis25.train.config import TrainConfig
    results = {"run": str(args.run), "share": args.share, "p5_steps": args.p5_steps, "phases": {}}
    for phase in args.phases.split(","):
        overrides = phase_overrides(phase, args.share, args.p5_steps)
        off = time_phase(args.run, phase, 0, args.work, overrides)
        on = time_phase(args.run, phase, TrainConfig.vision_cache_mb, args.work, overrides)
        results["phases"][phase] = {"off_s": off, "on_s": on}
        print(render({"phases": {phase: results["phases"][phase]}}).splitlines()[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vision_cache.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nwrote {RESULTS / 'vision_cache.json'}")


if __name__ == "__main__":
    main()
