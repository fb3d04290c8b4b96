"""`make demo`: train a tiny Ovis from scratch through the whole curriculum on the synthetic world.

    python -m ovis25.demo [--name demo] [--preset tiny|long|ci] [--seed 0] [--eval-limit 50] [--retrain]

Writes `runs/<name>/`: the world, an initial checkpoint, one checkpoint per phase (official format), and
after every phase `eval.json` = {phase: {task: {"accuracy", "n", "thinking"[, "mean_iou"]}}} (phases with
thinking-on evaluation appear again as `<phase>+think`), `preference.json` (held-out DPO pairs after P3 and
P4, with each pair's win and mode), `reward.json` (the held-out reward of sampled answers after P4 and P5,
with each question's: what GRPO maximises), `timings.json` (seconds for the world, each phase and all
evaluation), then `report.md` with plots, examples, and the P3 -> P4 and P4 -> P5 changes with their 95%
intervals over the same held-out items.

Run again, it resumes: finished phases are kept. A phase whose recipe or settings changed since it was trained
(and so every later phase) is refused unless `--retrain`, which trains those again; another seed or preset
needs another `--name`.

Phases (recipes in recipes/tiny/; `--preset long` takes P2's, P3's and P4's from recipes/long/): P0 language
pretraining of the from-scratch LLM on the world's text and P0v vision pretraining of the from-scratch visual
tokenizer on region labels (a real run starts from a pretrained Qwen3 and SigLIP2 instead), P1 VET pretraining
on captions, P2 multimodal pretraining, P3 instruction tuning with thinking traces, P4 DPO, P5 GRPO. The long
preset adds P2a-P2c before P2, the look-ups (`LOOKUP_PHASES`), on a world of their own in `runs/<name>/lookup/`,
scored on its test questions in `lookup.json`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .chat import Chat
from .checkpoint import DirectoryInUseError, exclusive_directory
from .cli import positive_int
from .eval import evaluate, format_table, load_items, pairs_by_kind, preference_accuracy, sampled_reward
from .processing import PixelBudgets
from .report import with_guessing_level, write_report

if TYPE_CHECKING:
    from .synth.pretrain import VisionPretrainConfig

log = logging.getLogger("ovis25.demo")
REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "tiny"
# resize budgets per kind of media, those the recipes (P2-P5) train with: evaluated as trained (an image of a
# pair at the single-image 160x160 instead of 128x128, or video frames at it instead of 96x96, cost P2's
# multi-image accuracy 0.16 and video 0.11, paired over 200 test questions)
BUDGETS = PixelBudgets(single_image_min_pixels=64 * 64, single_image_max_pixels=160 * 160,
                       multiple_image_min_pixels=64 * 64, multiple_image_max_pixels=128 * 128,
                       video_min_pixels=32 * 32, video_max_pixels=96 * 96)
TRAIN_PHASES = ("p0", "p0v", "p1", "p2", "p3", "p4", "p5")
# P0v per preset: the long one four times as long, which took seed 1's long run from counting 0.85 to 0.92
# (DEMO.md, "The long preset")
VISION = {"tiny": {}, "long": {"steps": 6000},
          "ci": {"scenes_per_task": 3, "test_scenes_per_task": 2, "batch_images": 8}}
HELD_OUT_PAIRS = 600  # pairs kept out of DPO to measure preference accuracy (every task in turn; <= 1/4 of all)
GREEDY_ITEMS = 50  # test items per task for the greedy accuracy tables (the sampled reward uses all of them)
REWARD_SAMPLES = 4  # sampled answers per held-out question when measuring GRPO's reward
ANSWER_TOKENS = {False: 32, True: 160}  # new tokens per evaluated answer, thinking off / on (trace first)
THINKING_FROM = "p3"  # thinking traces are learned in P3: evaluate thinking on from there
# the whole run (world to report) over P0's time. tiny, in fresh runs on three machines: 919/82, 964/93, 1887/159;
# with bfloat16 products (autocast), 1017/91. long, bfloat16: 4198/100 with P0v at 3000 steps, which 3000 more
# lengthen by about 3x P0; with them and the look-ups, 4717 s with a P0 slowed by another job (471 s), 4335/89
# with the P0 of a clean run on that machine
RUN_OVER_P0 = {"tiny": 11, "long": 49}
# The long preset first learns the look-up that a question about one named object needs, where it is easiest:
# three phases before P2 (recipes/long/lookup.toml), each one pass over one task of a world of their own
# (`lookup/`, the run's seed): the named object's place on one-token grids, spatial relations on such grids,
# then on the demo's scenes (DEMO.md, "Through the grids"). {preset: {phase: (task, questions)}}
LOOKUP_PHASES = {"long": {"p2a": ("grid_place", 40000), "p2b": ("grid_spatial", 20000), "p2c": ("spatial", 60000)},
                 "ci": {"p2a": ("grid_place", 24), "p2b": ("grid_spatial", 24), "p2c": ("spatial", 24)}}
FINGERPRINT = "inputs.sha256"  # in each phase's directory: the phase_fingerprints() entry it was trained from


def preference_datasets(world: Path) -> list[dict]:
    """`synth_dpo` (P4, all but the held-out pairs) and `synth_grpo` (P5) in the datainfo; returns the
    held-out pairs (one per task in turn, so every task is represented)."""
    info = json.loads((world / "datainfo.json").read_text())
    pairs = [json.loads(line) for line in (world / "dpo.jsonl").read_text().splitlines() if line.strip()]
    by_task: dict[str, list] = {}
    for p in pairs:
        by_task.setdefault(p["task"], []).append(p)
    held = [p for i in range(HELD_OUT_PAIRS) for t in by_task.values() if i < len(t) for p in [t[-1 - i]]]
    held = held[:min(HELD_OUT_PAIRS, len(pairs) // 4)]
    ids = {p["id"] for p in held}
    if "synth_dpo" not in info:
        (world / "meta" / "dpo_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs if p["id"] not in ids))
        info["synth_dpo"] = {"meta_file": "meta/dpo_train.jsonl", "image_dir": "images", "data_format": "conversation"}
        info["synth_grpo"] = {"meta_file": "grpo.jsonl", "image_dir": "images", "data_format": "conversation"}
        (world / "datainfo.json").write_text(json.dumps(info, indent=2))
    return held


def task_datasets(world: Path) -> None:
    """`synth_qa_<task>`: each task's questions of `synth_qa` as a dataset of its own, so that a recipe can weigh
    the tasks (`synth_qa_spatial:0.25`)."""
    info = json.loads((world / "datainfo.json").read_text())
    if any(name.startswith("synth_qa_") for name in info):
        return
    by_task: dict[str, list] = {}
    for s in json.loads((world / info["synth_qa"]["meta_file"]).read_text()):
        by_task.setdefault(s["task"], []).append(s)
    for task, samples in by_task.items():
        (world / "meta" / f"qa_{task}.json").write_text(json.dumps(samples))
        info[f"synth_qa_{task}"] = {"meta_file": f"meta/qa_{task}.json", "image_dir": "images",
                                    "data_format": "conversation"}
    (world / "datainfo.json").write_text(json.dumps(info, indent=2))


TEXT_PER_TASK = 600  # context-QA samples per single-image task in the text-only P0 set
TEXT_THINK_PER_TASK = 300  # ... and thinking traces reasoning from the caption, per single-image task
# extra "the number 4753\nWhat number is written?" -> "4753" samples in P0: a from-scratch LLM only learns to copy
# a digit string it has not seen from its context (an induction head) with thousands of them
TEXT_NUMBERS = 3000


def text_only_dataset(world: Path, seed: int = 0) -> None:
    """`synth_text` (P0): teach the LLM to *read scene information from its context*.

    A captioned scene stands where the image will be: "{caption}\n{question}" -> answer, and
    "{caption}\nDescribe the image." -> caption (copying). P1 then only has to make the visual tokens say
    what the caption says (the frozen LLM already knows how to use them), and P2 starts from an LLM that
    looks at its context. An LLM pretrained on bare questions instead learns answer priors and ignores the
    image. Multi-image and video questions have no caption and stay bare (answer format only).
    Thinking traces from the caption ("{caption}\n{question}" -> "<think>...</think>" + answer, a third of them
    self-correcting as in P3) stand in for the reasoning a pretrained Qwen3 brings, and `TEXT_NUMBERS` more
    number-reading samples teach copying (with only the 600 OCR ones, P0 copied a number from its caption
    0.38-0.54 of the time; with them 1.00). Together they raised OCR after P2 by about 0.1 (two seeds)."""
    from .synth.build import CAPTIONED, SELF_CORRECT, task_rng
    from .synth.world import TASKS, Sample, thinking

    info = json.loads((world / "datainfo.json").read_text())
    if "synth_text" in info:
        return
    samples = []

    def add(sid: str, human: str, gpt: str) -> None:
        samples.append({"id": f"text-{sid}", "conversations": [{"from": "human", "value": human},
                                                               {"from": "gpt", "value": gpt}]})

    def add_scene(sid: str, sample: Sample, gpt: str) -> None:  # the caption stands where the image will be
        add(sid, f"{sample.caption}\n{sample.question}", gpt)

    for s in json.loads((world / info["synth_caption"]["meta_file"]).read_text()):
        add(s["id"], f"{s['caption']}\nDescribe the image.", s["caption"])
    for task in CAPTIONED:  # fresh scenes from their own stream: only their text is kept
        rng = task_rng(seed, "text", task)
        for i in range(TEXT_PER_TASK):
            sample = TASKS[task](rng)
            add_scene(f"{task}-{i}", sample, sample.answer)
        rng = task_rng(seed, "text-think", task)
        for i in range(TEXT_THINK_PER_TASK):
            sample = TASKS[task](rng)
            add_scene(f"think-{task}-{i}", sample, thinking(sample, self_correct=rng.random() < SELF_CORRECT))
    rng, n = task_rng(seed, "text-numbers", "ocr"), 0
    while n < TEXT_NUMBERS:
        sample = TASKS["ocr"](rng)
        if sample.meta["kind"] == "number":
            add_scene(f"number-{n}", sample, sample.answer)
            n += 1
    bare: dict[str, int] = {}
    for s in json.loads((world / info["synth_qa"]["meta_file"]).read_text()):
        if s["task"] not in CAPTIONED and bare.setdefault(s["task"], 0) < TEXT_PER_TASK:
            bare[s["task"]] += 1
            conv = [{"from": t["from"], "value": re.sub(r"<(image|video)>\n?", "", t["value"])}
                    for t in s["conversations"]]
            samples.append({"id": f"text-{s['id']}", "conversations": conv})
    (world / "meta" / "text.json").write_text(json.dumps(samples))
    info["synth_text"] = {"meta_file": "meta/text.json", "image_dir": "images", "data_format": "conversation"}
    (world / "datainfo.json").write_text(json.dumps(info, indent=2))


def phases(preset: str) -> tuple[str, ...]:
    """The preset's phases in order: `TRAIN_PHASES`, with its look-up phases before P2."""
    at = TRAIN_PHASES.index("p2")
    return TRAIN_PHASES[:at] + tuple(LOOKUP_PHASES.get(preset, {})) + TRAIN_PHASES[at:]


def lookup_sizes(preset: str) -> dict:
    """The look-up world's sizes: each look-up phase's questions, and the preset's test questions per task."""
    from .synth.build import resolve_sizes
    return resolve_sizes({"qa": dict(LOOKUP_PHASES[preset].values()), "test": resolve_sizes(preset)["test"]})


def evaluate_phase(model_dir: Path, world: Path, phase: str, thinking: bool, limit: int | None,
                   results: dict, run: Path, file: str = "eval.json", answers: str = "answers") -> None:
    """Greedy answers to `world`'s test questions (thinking off, and on with `thinking`) into `run/<file>`
    under the phase's name, each answer in `run/<phase>/<answers>[-think].jsonl`."""
    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    items = load_items(world / "test.jsonl", world / "images", limit)
    modes = [False, True] if thinking else [False]
    for think in modes:
        summary, rows = evaluate(chat, items, think, max_new_tokens=ANSWER_TOKENS[think], budgets=BUDGETS)
        key = f"{phase}+think" if think else phase
        results[key] = summary
        (run / phase / f"{answers}{'-think' if think else ''}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n")
    (run / file).write_text(json.dumps(results, indent=2))
    if phase in ("p4", "p5"):  # GRPO should raise the reward of what the policy samples, as in its rollouts
        rewards = json.loads((run / "reward.json").read_text()) if (run / "reward.json").exists() else {}
        # a small gain needs many items to show: every test item, not only the greedy tables' share
        every_item = items if limit is None else load_items(world / "test.jsonl", world / "images")
        rewards[phase] = sampled_reward(chat, every_item, REWARD_SAMPLES, temperature=1.0,
                                        max_new_tokens=ANSWER_TOKENS[False], seed=0, budgets=BUDGETS)
        (run / "reward.json").write_text(json.dumps(rewards, indent=2))


class StaleRunError(ValueError):
    """A run directory holds phases trained from other inputs than the ones asked for."""


def recipe(preset: str, phase: str) -> Path:
    """A phase's recipe: the preset's own (recipes/<preset>/<phase>.toml) where it has one, else the tiny one;
    the look-up phases' is recipes/long/lookup.toml."""
    if phase in LOOKUP_PHASES.get(preset, {}):
        return RECIPES.parent / "long" / "lookup.toml"
    own = RECIPES.parent / preset / f"{phase}.toml"
    return own if own.exists() else RECIPES / f"{phase}.toml"


def vision_config(preset: str, overrides: dict) -> VisionPretrainConfig:
    from .synth.pretrain import VisionPretrainConfig
    steps = {"steps": overrides["max_steps"]} if "max_steps" in overrides else {}
    return VisionPretrainConfig(**{**VISION[preset], **steps})


def phase_fingerprints(preset: str, seed: int, overrides: dict, phase_overrides: dict) -> dict[str, str]:
    """Per phase, a hash of everything its checkpoint was trained from: the preset and seed, its recipe (or
    P0v's config) with the overrides, and the phase before it's fingerprint, so a change reaches every later
    phase. A look-up phase's includes its task and the look-up world's sizes."""
    fingerprint, out = f"{preset}:{seed}", {}
    for phase in phases(preset):
        if phase == "p0v":
            inputs = json.dumps(asdict(vision_config(preset, overrides)), sort_keys=True)
        else:
            keys = {k: v for k, v in {**overrides, **phase_overrides.get(phase, {})}.items() if k != "progress"}
            inputs = recipe(preset, phase).read_text() + json.dumps(keys, sort_keys=True)
            if phase in LOOKUP_PHASES.get(preset, {}):
                inputs += json.dumps([LOOKUP_PHASES[preset][phase], lookup_sizes(preset)], sort_keys=True)
        fingerprint = out[phase] = hashlib.sha256((fingerprint + "\n" + inputs).encode()).hexdigest()
    return out


def check_resumable(run: Path, preset: str, seed: int, fingerprints: dict[str, str], retrain: bool) -> None:
    """Refuse to resume a run whose world or finished phases came from other inputs (a stale checkpoint would be
    kept silently); with `retrain`, delete the stale phases, which are then trained again."""
    from .synth.build import resolve_sizes
    worlds = [("world", resolve_sizes(preset))]
    if preset in LOOKUP_PHASES:
        worlds.append(("lookup", lookup_sizes(preset)))
    for name, sizes in worlds:
        manifest = run / name / "world.json"
        if not manifest.exists():
            continue
        world = json.loads(manifest.read_text())
        if world.get("seed") != seed or world.get("sizes") != sizes:
            raise StaleRunError(f"{run / name} holds a world built with seed {world.get('seed')} and sizes "
                                f"{world.get('sizes')}, not seed {seed} with the {preset!r} preset: choose another "
                                f"--name (or delete {run})")
    # a phase's fingerprint is written when it starts, so an interrupted phase is checked too (its checkpoints
    # would resume); phases trained before fingerprints were written have none and are kept
    order = phases(preset)
    recorded = {p: (run / p / FINGERPRINT).read_text().strip() for p in order if (run / p / FINGERPRINT).exists()}
    stale = [p for p, fingerprint in recorded.items() if fingerprint != fingerprints[p]]
    if not stale:
        return
    later = order[order.index(stale[0]):]
    if not retrain:
        reach = f" (a change in {stale[0]} reaches every later phase)" if len(later) > 1 else ""
        raise StaleRunError(f"{run}: {', '.join(stale)} trained from another recipe or settings than now{reach}: pass "
                            f"--retrain (make demo ARGS=--retrain) to train {', '.join(later)} again, or choose "
                            f"another --name")
    log.warning("%s: %s stale; training %s again", run, ", ".join(stale), ", ".join(later))
    for phase in later:
        shutil.rmtree(run / phase, ignore_errors=True)


def run_demo(name: str = "demo", preset: str = "tiny", seed: int = 0, overrides: dict | None = None,
             eval_limit: int | None = GREEDY_ITEMS, runs_dir: Path = Path("runs"),
             phase_overrides: dict[str, dict] | None = None, retrain: bool = False) -> Path:
    """Run (or resume: finished phases are kept) the curriculum; `overrides` apply to every phase's recipe,
    `phase_overrides[phase]` to one phase only. A resumed run refuses phases trained from other inputs
    (`StaleRunError`) unless `retrain`, which trains them and every later phase again. A second demo on the
    same run directory stops at once (`DirectoryInUseError`)."""
    if eval_limit is not None and eval_limit < 1:  # checked first: a resumed run rewrites eval.json
        raise ValueError(f"eval_limit must be at least 1 (None: every test item), got {eval_limit}")
    run = runs_dir / name
    with exclusive_directory(run, "demo"):
        return run_curriculum(run, preset, seed, overrides or {}, phase_overrides or {}, eval_limit, retrain)


def run_curriculum(run: Path, preset: str, seed: int, overrides: dict, phase_overrides: dict[str, dict],
                   eval_limit: int | None, retrain: bool) -> Path:
    """`run_demo`'s work, in a run directory this process holds."""
    from .synth import build_world, write_model_dir
    from .synth.pretrain import pretrain_visual_tokenizer
    from .train import load_recipe, train

    fingerprints = phase_fingerprints(preset, seed, overrides, phase_overrides)
    check_resumable(run, preset, seed, fingerprints, retrain)
    # seconds per part of the run; a resumed run keeps the times of what it does not redo
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    timings["evaluation"] = 0.0
    t0 = time.perf_counter()
    world = run / "world"
    if not (world / "world.json").exists():
        log.info("building the synthetic world (%s preset) in %s", preset, world)
        build_world(world, seed=seed, sizes=preset, progress=True)
        timings["world"] = time.perf_counter() - t0
    lookup, lookups = run / "lookup", LOOKUP_PHASES.get(preset, {})
    if lookups and not (lookup / "world.json").exists():
        t0 = time.perf_counter()
        log.info("building the look-up world in %s", lookup)
        build_world(lookup, seed=seed, sizes=lookup_sizes(preset), tokenizer=False, progress=True,
                    tasks=[task for task, _ in lookups.values()])
        timings["world"] = timings.get("world", 0.0) + time.perf_counter() - t0
    if lookups:
        task_datasets(lookup)
    text_only_dataset(world, seed)
    task_datasets(world)
    held_pairs = preference_datasets(world)
    init = run / "init"
    if not (init / "config.json").exists():
        write_model_dir(init, world / "tokenizer", seed=seed)

    results = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    lookup_results = json.loads((run / "lookup.json").read_text()) if (run / "lookup.json").exists() else {}
    preference = json.loads((run / "preference.json").read_text()) if (run / "preference.json").exists() else {}
    previous, order = init, phases(preset)
    for phase in order:
        t0 = time.perf_counter()
        final = run / phase / "final"
        trained = not (final / "config.json").exists()
        if trained:
            (run / phase).mkdir(exist_ok=True)
            (run / phase / FINGERPRINT).write_text(fingerprints[phase] + "\n")
        if phase == "p0v" and trained:
            pretrain_visual_tokenizer(previous, run / phase, seed, vision_config(preset, overrides),
                                      progress=overrides.get("progress", True))
        elif trained:
            data, datasets = world, []
            if phase in lookups:  # its task's questions of the look-up world
                data, datasets = lookup, [f'datasets=["synth_qa_{lookups[phase][0]}"]']
            keys = [f'init="{previous}"', f'out_dir="{run / phase}"', f'datainfo="{data / "datainfo.json"}"',
                    f"seed={seed}", *datasets]
            keys += [f"{k}={json.dumps(v)}" for k, v in {**overrides, **phase_overrides.get(phase, {})}.items()]
            train(load_recipe(recipe(preset, phase), keys))
        if trained:
            timings[phase] = time.perf_counter() - t0
            if phase == "p0" and preset in RUN_OVER_P0:  # machines differ 2x in speed: say what to expect here
                log.info("P0 took %.0f s: on this machine the whole demo should take about %.0f minutes",
                         timings[phase], RUN_OVER_P0[preset] * timings[phase] / 60)
        t0 = time.perf_counter()
        if phase in lookups:  # on the look-up world's test questions: every look-up's, spatial on scenes included
            evaluate_phase(final, lookup, phase, False, eval_limit, lookup_results, run, file="lookup.json",
                           answers="lookup-answers")
            print(f"\n== after {phase} (look-ups)\n" + format_table(lookup_results))
        elif phase not in ("p0", "p0v"):
            evaluate_phase(final, world, phase, phase >= THINKING_FROM, eval_limit, results, run)
        if phase in ("p3", "p4"):  # DPO should raise it
            from .model import Ovis
            from .processing import Processor
            preference[phase] = preference_accuracy(
                Ovis.from_pretrained(final), Processor.from_pretrained(final), held_pairs, world / "images", BUDGETS)
            (run / "preference.json").write_text(json.dumps(preference, indent=2))
            wins = preference[phase]["wins"]
            print(f"preference accuracy on {len(held_pairs)} held-out pairs after {phase}: " + ", ".join(
                f"{k} {sum(wins[i] for i in idx) / len(idx):.2f}"
                for k, idx in pairs_by_kind(preference[phase]["kinds"]).items()))
            print(f"\n== after {phase}\n" + format_table({k: v for k, v in results.items() if k.startswith(phase)}))
        timings["evaluation"] += time.perf_counter() - t0
        write_timings(run, timings, order)
        previous = final
    link = run / "final"  # the last phase's checkpoint, for `ovis25 chat runs/<name>/final`
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(previous.resolve(), target_is_directory=True)
    write_report(run, results, write_timings(run, timings, order))
    return run


def try_it(run: Path) -> str:
    """The chat command for the first counting test question, at the budget the model was trained with (the
    chat's default, 448x448 and up, would show the tiny model images far larger than any it saw)."""
    item = next(it for it in load_items(run / "world" / "test.jsonl", run / "world" / "images") if it.task == "count")
    lo, hi = BUDGETS.for_kind("single_image")
    question = item.conversations[0]["value"].replace("<image>\n", "")
    return (f"Try it:  ovis25 chat {run / 'final'} --min-pixels {lo} --max-pixels {hi} --image {item.images[0]} "
            f"\"{question}\"   (answer: {item.answer})")


def write_timings(run: Path, timings: dict, order: Sequence[str]) -> dict:
    """`timings.json` in a fixed order (the world, the phases in `order`, evaluation), with "total" the sum of the
    parts -> that dict."""
    order = ["world", *order, "evaluation"]
    ordered = {k: timings[k] for k in order if k in timings}
    ordered["total"] = sum(ordered.values())
    (run / "timings.json").write_text(json.dumps(ordered, indent=2))
    return ordered


def main(argv: list[str] | None = None) -> None:
    from .synth.build import PRESETS

    lookups = sum(n for _, n in LOOKUP_PHASES["long"].values())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="demo")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "long", "ci"],
                    help=f"tiny: the 15-minute demo; long: the look-ups on {lookups} questions, then P2 on "
                         f"{sum(PRESETS['long']['qa'].values())} fresh ones (about 76 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=positive_int, default=GREEDY_ITEMS,
                    help="greedy accuracy on at most this many test items per task (the sampled reward uses all)")
    ap.add_argument("--retrain", action="store_true",
                    help="train again the phases of runs/<name> whose recipe changed since (and every later one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        run = run_demo(args.name, args.preset, args.seed, eval_limit=args.eval_limit, retrain=args.retrain)
    except (StaleRunError, DirectoryInUseError) as e:
        raise SystemExit(f"ovis25 demo: {e}") from None
    results = json.loads((run / "eval.json").read_text())
    print("\n" + format_table(with_guessing_level(run, results)))
    print(f"\nReport: {run / 'report.md'}")
    print(try_it(run))


if __name__ == "__main__":
    main()
