"""Learning curves of the demo's tiny Ovis on the synthetic tasks, alone or together: can this size reach the targets?

    python benchmarks/demo_curves.py [--run runs/demo | --init DIR] [--tasks count,attribute,ocr,chart,grounding]
                                     [--questions 12000] [--eval-every 150] [--test 200] [--grids] [--together]
                                     [--out NAME] [key=value ...]   # overrides of the P2 recipe

For each task: a world of that task alone (`--questions` fresh training questions, `--test` held-out ones),
then the P2 recipe (recipes/tiny/p2.toml, one epoch) from the demo's P1 checkpoint (`RUN/p1/final`: the
language, vision and VET pretraining already done; `--init DIR` names another checkpoint), with a checkpoint
every `--eval-every` steps. Each checkpoint answers the held-out questions greedily, scored as in `ovis25 eval`
(grounding: IoU >= 0.5, mean IoU alongside). The learning rate follows one cosine schedule over the whole
run, so an early point is a lower bound on what a run of that length would reach.

`--grids` draws the spatial and grounding tasks' scenes as 64 x 64 grids with each object alone in one visual
token, the easy form of their look-ups (DEMO.md, "Which part of the look-up is hard").

In the demo's P2 each task gets 1/8 of the steps; here it gets all of them, so a curve shows whether a target
is out of reach for the model size or only for the demo's 15-minute budget. `--together` trains the tasks in one
run instead, weighed as the demo's P2 weighs them (`--questions` per task, a quarter for spatial and grounding):
the demo's P2 made longer, with fresh questions. Prints a table and writes
benchmarks/results/NAME.json and NAME.png (NAME: demo_curves unless --out says otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ovis25.demo import BUDGETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PIXELS = BUDGETS.for_media(1, 0)  # one image, as the demo evaluates the one-image tasks
TARGETS = {"count": 0.9, "attribute": 0.9, "ocr": 0.9, "chart": 0.7, "grounding": 0.5}  # grounding: mean IoU


def p1_checkpoint(run: Path, init: Path | None = None) -> Path:
    """Where the one-task runs start: `init` (an --init checkpoint), else the demo run's P1 checkpoint (exits if
    it is not a checkpoint, or the demo has not run)."""
    if init is not None and not (init / "config.json").exists():
        sys.exit(f"--init {init}: not a checkpoint directory (no config.json)")
    init = init or run / "p1" / "final"
    if not (init / "config.json").exists():
        sys.exit(f"{init}: no P1 checkpoint; run `make demo` first (or pass --run)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return init


def checkpoint_model(init: Path, ckpt: Path):
    """The model of a resumable training checkpoint (its weights on the init's architecture)."""
    from ovis25.checkpoint import TIED_KEY
    from ovis25.model import Ovis
    model = Ovis.from_pretrained(init).eval()
    state = load_file(str(ckpt / "model.safetensors"))
    if TIED_KEY not in state and model.config.llm_config.tie_word_embeddings:
        state[TIED_KEY] = state["llm.model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model


def score(model, processor, items) -> dict[str, dict]:
    """Per task: greedy accuracy on the held-out items, scored as `ovis25 eval` scores them."""
    from ovis25.chat import Chat
    from ovis25.eval import evaluate
    summary, rows = evaluate(Chat(model, processor), items, False, max_new_tokens=32, progress=False,
                             budgets=BUDGETS)
    numbers = [r["score"] for r in rows if r["task"] == "ocr" and r["answer"].isdigit()]
    if numbers:  # the OCR target is on reading digits
        summary["ocr"]["numbers_accuracy"] = sum(numbers) / len(numbers)
    return summary


ON_GRIDS = ("spatial", "grounding")  # the tasks `--grids` can draw on one-token grids (2-4 objects of distinct kinds)


@contextlib.contextmanager
def on_grids():
    """Scenes drawn as one-token grids (`synth.world.grid_scene`: 64 x 64, each object alone in one visual
    token) while the world is built, the look-ups' easy form."""
    from ovis25.synth import world
    scene = world.scene
    world.scene = world.grid_scene  # the tasks look it up at call time
    try:
        yield
    finally:
        world.scene = scene


def shares(datasets: list[str], tasks: list[str]) -> dict[str, float]:
    """Each task's share of its questions in a recipe's dataset list (`synth_qa_spatial:0.25` -> 0.25)."""
    from ovis25.train.data import dataset_entry
    weights = dict(map(dataset_entry, datasets))
    return {task: weights.get(f"synth_qa_{task}", 1.0) for task in tasks}


def task_curves(tasks: list[str], init: Path, work: Path, questions: int, test: int, eval_every: int, seed: int,
                overrides: list[str] = (), weighed: bool = False) -> dict[str, list]:
    """One P2 run (recipes/tiny/p2.toml, one pass) on a world of these tasks in `work`, `questions` per task, all
    of them (`weighed`: as many as the demo's P2 weighs each task, `synth_qa_spatial:0.25` a quarter); every
    checkpoint scored on the held-out questions. Returns each task's curve."""
    from ovis25.demo import task_datasets
    from ovis25.eval import load_items
    from ovis25.model import Ovis
    from ovis25.processing import Processor
    from ovis25.synth import build_world
    from ovis25.synth.build import PRESETS
    from ovis25.train import load_recipe, train

    world = work / "world"
    sizes = {"qa": questions, "test": test}
    if weighed:  # with captions, as many per question as in the demo's world
        sizes["caption"] = round(questions * PRESETS["tiny"]["caption"] / PRESETS["tiny"]["qa"])
    build_world(world, seed=seed, sizes=sizes, tokenizer=False, tasks=tasks)
    if weighed:
        task_datasets(world)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)  # else train() resumes a previous run's checkpoints, whatever the init
    t0 = time.perf_counter()
    cfg = load_recipe(ROOT / "recipes" / "tiny" / "p2.toml", [
        f'init="{init}"', f'out_dir="{run}"', f'datainfo="{world / "datainfo.json"}"', f"seed={seed}", "epochs=1",
        f"save_every={eval_every}", "keep_last=1000", *overrides])
    if weighed:  # the recipe's own list and weights, for these tasks
        keep = {"synth_caption", *(f"synth_qa_{task}" for task in tasks)}
        cfg.datasets = [d for d in cfg.datasets if d.split(":")[0] in keep]
    else:
        cfg.datasets = ["synth_qa", "synth_caption"]
    share = shares(cfg.datasets, tasks)
    cfg.max_steps = None  # one pass over the questions, whatever the demo's P2 stops at
    train(cfg)
    train_s = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    total = max(m["step"] for m in metrics if "step" in m)
    processor = Processor.from_pretrained(init)
    items = load_items(world / "test.jsonl", world / "images")
    models = [(0, lambda: Ovis.from_pretrained(init).eval())]
    models += [(int(c.name.split("-")[1]), lambda c=c: checkpoint_model(init, c))
               for c in sorted((run / "checkpoints").glob("step-*"))]
    models.append((total, lambda: Ovis.from_pretrained(run / "final").eval()))
    curves: dict[str, list] = {task: [] for task in tasks}
    for step, load in models:
        for task, point in score(load(), processor, items).items():
            curves[task].append({"step": step, **point, "questions_seen": round(step / total * questions * share[task]),
                                 "train_s": round(step / total * train_s, 1)})
    return curves


def render(results: dict) -> str:
    lines = []
    for task, points in results["curves"].items():
        metric = "mean IoU" if task == "grounding" else "accuracy"
        extra = next((k for k in ("mean_iou", "numbers_accuracy") if k in points[0]), None)
        lines += [f"\n{task} (target {metric} >= {TARGETS.get(task, '-')}):",
                  f"| step | questions seen | train s | accuracy | {extra or '-'} |", "|---|---|---|---|---|"]
        lines += [f"| {p['step']} | {p['questions_seen']} | {p['train_s']} | {p['accuracy']:.2f} | "
                  + (f"{p[extra]:.2f} |" if extra else "- |") for p in points]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, points in results["curves"].items():
        key = "mean_iou" if task == "grounding" else "accuracy"
        line, = ax.plot([p["questions_seen"] for p in points], [p[key] for p in points], marker="o",
                        label=f"{task} ({'mean IoU' if key == 'mean_iou' else 'accuracy'})")
        if "numbers_accuracy" in points[0]:  # the OCR-digit target is on the numbers
            ax.plot([p["questions_seen"] for p in points], [p["numbers_accuracy"] for p in points], marker=".",
                    linestyle="--", color=line.get_color(), label=f"{task} (numbers only)")
        if task in TARGETS:
            ax.axhline(TARGETS[task], color=line.get_color(), linestyle=":", linewidth=1)
    together = results.get("together")
    ax.set_xlabel(f"training questions seen ({'of each task, all in one run' if together else 'one task alone'})")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1)
    ax.set_title(f"Tiny Ovis, {'the tasks together' if together else 'one task at a time'}"
                 " (dotted: the issue's targets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--init", type=Path, help="start from this checkpoint instead of the run's P1")
    ap.add_argument("--tasks", default=",".join(TARGETS))
    ap.add_argument("--questions", type=int, default=12000)
    ap.add_argument("--eval-every", type=int, default=150, help="training steps between checkpoints")
    ap.add_argument("--test", type=int, default=200, help="held-out questions per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grids", action="store_true", help=f"draw the scenes as one-token grids ({', '.join(ON_GRIDS)})")
    ap.add_argument("--together", action="store_true",
                    help="train the tasks in one run, weighed as the demo's P2 weighs them, instead of each alone")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "curves")
    ap.add_argument("--out", default="demo_curves", help="name of the result files in benchmarks/results")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the P2 recipe, e.g. train_modules=...")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if args.grids and set(tasks) - set(ON_GRIDS):
        raise SystemExit(f"--grids: only {', '.join(ON_GRIDS)} draw scenes a grid can hold, not "
                         f"{', '.join(sorted(set(tasks) - set(ON_GRIDS)))}")
    init = p1_checkpoint(args.run, args.init)
    results = {"init": str(init), "questions": args.questions, "test": args.test, "threads": torch.get_num_threads(),
               "overrides": args.overrides, "grids": args.grids, "together": args.together, "curves": {}}
    runs = [(tasks, args.work / "together")] if args.together else [([task], args.work / task) for task in tasks]
    for run_tasks, work in runs:
        with on_grids() if args.grids else contextlib.nullcontext():
            curves = task_curves(run_tasks, init, work, args.questions, args.test, args.eval_every, args.seed,
                                 args.overrides, weighed=args.together)
        results["curves"].update(curves)
        print(render({"curves": curves}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / f"{args.out}.png")
    print(render(results))
    print(f"\nwrote {RESULTS / args.out}.json and .png")


if __name__ == "__main__":
    main()
