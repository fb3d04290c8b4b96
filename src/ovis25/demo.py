"""`make demo`: train a tiny Ovis from scratch through the whole curriculum on the synthetic world.

    python -m ovis25.demo [--name demo] [--preset tiny|ci] [--seed 0] [--quick]

Writes `runs/<name>/`: the world, an initial checkpoint, one checkpoint per phase (official format), and
after every phase `eval.json` = {phase: {task: {"accuracy", "n", "thinking"[, "mean_iou"]}}} (phases with
thinking-on evaluation appear again as `<phase>+think`), then `report.md` with plots and examples.

Phases (recipes in recipes/tiny/): P0 language pretraining of the from-scratch LLM on the world's text
(a real run starts from a pretrained Qwen3 instead), P1 VET pretraining on captions, P2 multimodal
pretraining, P3 instruction tuning with thinking traces, P4 DPO, P5 GRPO.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch

from .chat import Chat
from .eval import evaluate, format_table, load_items
from .report import write_report

log = logging.getLogger("ovis25.demo")
REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "tiny"
PIXELS = {"min_pixels": 64 * 64, "max_pixels": 160 * 160}
TRAIN_PHASES = ("p0", "p1", "p2", "p3")
THINKING_FROM = "p3"  # thinking traces are learned in P3: evaluate thinking on from there


def text_only_dataset(world: Path) -> None:
    """`synth_text`: captions and answers as plain text conversations (placeholders and images removed)."""
    info = json.loads((world / "datainfo.json").read_text())
    if "synth_text" in info:
        return
    samples = []
    for name in ("synth_caption", "synth_qa"):
        meta = json.loads((world / info[name]["meta_file"]).read_text())
        for s in meta:
            if "caption" in s:
                conv = [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": s["caption"]}]
            else:
                conv = [{"from": t["from"], "value": re.sub(r"<(image|video)>\n?", "", t["value"])}
                        for t in s["conversations"]]
            samples.append({"id": f"text-{s['id']}", "conversations": conv})
    (world / "meta" / "text.json").write_text(json.dumps(samples))
    info["synth_text"] = {"meta_file": "meta/text.json", "image_dir": "images", "data_format": "conversation"}
    (world / "datainfo.json").write_text(json.dumps(info, indent=2))


def evaluate_phase(model_dir: Path, world: Path, phase: str, thinking: bool, limit: int | None,
                   results: dict, run: Path) -> None:
    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    items = load_items(world / "test.jsonl", world / "images", limit)
    modes = [False, True] if thinking else [False]
    for think in modes:
        summary, rows = evaluate(chat, items, think, max_new_tokens=160 if think else 32, **PIXELS)
        key = f"{phase}+think" if think else phase
        results[key] = summary
        (run / phase / f"answers{'-think' if think else ''}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "eval.json").write_text(json.dumps(results, indent=2))


def run_demo(name: str = "demo", preset: str = "tiny", seed: int = 0, overrides: dict | None = None,
             eval_limit: int | None = None, runs_dir: Path = Path("runs")) -> Path:
    from .synth import build_world, write_model_dir
    from .train import load_recipe, train

    run = runs_dir / name
    run.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    world = run / "world"
    if not (world / "world.json").exists():
        log.info("building the synthetic world (%s preset) in %s", preset, world)
        build_world(world, seed=seed, sizes=preset, progress=True)
    text_only_dataset(world)
    init = run / "init"
    if not (init / "config.json").exists():
        write_model_dir(init, world / "tokenizer", seed=seed)

    results = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    timings = {}
    previous = init
    for phase in TRAIN_PHASES:
        t0 = time.perf_counter()
        final = run / phase / "final"
        if not (final / "config.json").exists():
            keys = [f'init="{previous}"', f'out_dir="{run / phase}"', f'datainfo="{world / "datainfo.json"}"',
                    f"seed={seed}"] + [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
            train(load_recipe(RECIPES / f"{phase}.toml", keys))
        timings[phase] = time.perf_counter() - t0
        if phase != "p0":
            evaluate_phase(final, world, phase, phase >= THINKING_FROM, eval_limit, results, run)
            print(f"\n== after {phase}\n" + format_table({k: v for k, v in results.items() if k.startswith(phase)}))
        previous = final
    link = run / "final"  # the last phase's checkpoint, for `ovis25 chat runs/<name>/final`
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(previous.resolve(), target_is_directory=True)
    timings["total"] = time.perf_counter() - t_start
    write_report(run, results, timings)
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="demo")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "ci"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="at most this many test items per task")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = run_demo(args.name, args.preset, args.seed, eval_limit=args.eval_limit)
    results = json.loads((run / "eval.json").read_text())
    print("\n" + format_table(results))
    print(f"\nReport: {run / 'report.md'}")
    print(f"Try it:  ovis25 chat {run / 'final'} --image {run / 'world/images/test/count'}/test-count-00000.png "
          f"\"How many circles are there?\"")


if __name__ == "__main__":
    main()
