"""Write a synthetic world to disk in the official Ovis dataset format, one file set per training phase.

    OUT/world.json             manifest: sizes, files, per-phase dataset names, counts
    OUT/datainfo.json          {"synth_caption" | "synth_qa" | "synth_think": {meta_file, image_dir, data_format, ...}}
    OUT/meta/caption.json      P1: [{"id", "image", "caption"}]                   (data_format "caption")
    OUT/meta/qa.json           P2/P3: [{"id", "task", "image" | "video_frames", "conversations"}]
    OUT/meta/think.json        P3: as qa, the gpt value is "<think>\\n...\\n</think>\\n\\n" + answer
    OUT/dpo.jsonl              P4: {"id", "task", "kind", visuals, "conversations" (prompt), "chosen", "rejected"}
                               (kinds: see PAIR_KINDS)
    OUT/grpo.jsonl             P5: {"id", "task", visuals, "conversations" (prompt), "answer", "reward"}
    OUT/test.jsonl             held out: {"id", "task", visuals, "question", "conversations", "answer", "metric",
                               "category" (`world.question_category`)}
    OUT/images/<split>/<task>/<id>[_k].png
    OUT/tokenizer/             a BPE trained on the world's text (see ovis25.synth.tokenizer)

Every path inside a file is relative: datainfo paths to the datainfo's folder, image paths to `images/`,
so a world can be moved. Each (split, task) draws from its own seeded stream, so the same seed gives
byte-identical files, and no held-out image equals a training image.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .world import TASKS, WARMUPS, Sample, misled_thinking, question_category, thinking, unfaithful_thinking

SPLITS = ("caption", "qa", "think", "dpo", "grpo", "test")
CAPTIONED = ("count", "attribute", "spatial", "ocr", "chart", "grounding")  # single-image tasks
PRESETS = {  # samples per task and split ({task: samples} where tasks differ)
    "ci": {"caption": 3, "qa": 4, "think": 3, "dpo": 2, "grpo": 2, "test": 3},
    "tiny": {"caption": 400, "qa": 3000, "think": 120, "dpo": 300, "grpo": 300, "test": 200},
    # `make demo-long`: P2 passes once over fresh questions, as many per task as its target needs alone
    # (DEMO.md, "How far this size goes"), chart 20000 more, which its sums need in the mix (recipes/long/p2.toml);
    # spatial and grounding, which no budget taught, a few thousand
    "long": {"caption": 400, "think": 120, "dpo": 300, "grpo": 300, "test": 200,
             "qa": {"count": 40000, "attribute": 30000, "spatial": 6000, "ocr": 80000, "chart": 70000,
                    "grounding": 6000, "multi_image": 10000, "video": 10000}},
}
DRAWS = {**TASKS, **WARMUPS}  # what a world can hold; by default the tasks
IMAGE_DIR = "images"
CAPTION_TEMPLATE = "<image>\nDescribe the image."
SELF_CORRECT = 1 / 3  # share of thinking traces that catch and fix a slip
# Preference pairs, by kind and share. "answer": the right answer vs a plausible wrong one; "misled": a right
# trace vs one shaped like it that misreads the image (both need perception to tell apart); "unfaithful": the
# right trace with its answer vs the same trace followed by the wrong answer (the answer must follow the
# reasoning). Thinking-mode pairs keep thinking mode alive through DPO.
PAIR_KINDS = {"unfaithful": 1 / 3, "misled": 1 / 6, "answer": 1 / 2}
DATASETS = {  # datainfo name -> (split, data_format)
    "synth_caption": ("caption", "caption"),
    "synth_qa": ("qa", "conversation"),
    "synth_think": ("think", "conversation"),
}
PHASES = {"p1": ["synth_caption"], "p2": ["synth_qa"], "p3": ["synth_qa", "synth_think"], "p4": "dpo.jsonl",
          "p5": "grpo.jsonl"}


def resolve_sizes(sizes: dict | str) -> dict[str, int | dict[str, int]]:
    """A preset name or {split: samples per task, or {task: samples}} -> every split's size."""
    if isinstance(sizes, str):
        if sizes not in PRESETS:
            raise ValueError(f"unknown preset {sizes!r}; choose one of {sorted(PRESETS)}")
        return dict(PRESETS[sizes])
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"sizes: unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    resolved = {}
    for split in SPLITS:
        size = sizes.get(split, 0)
        if isinstance(size, dict):
            bad = sorted(set(size) - set(DRAWS))
            if bad:
                raise ValueError(f"sizes[{split!r}]: unknown task(s) {bad}; tasks are {list(DRAWS)}")
            resolved[split] = {task: int(n) for task, n in size.items()}
        else:
            resolved[split] = int(size)
    return resolved


def split_size(sizes: dict, split: str, task: str) -> int:
    """Samples of one task in one split (a task a per-task size leaves out has none)."""
    size = sizes[split]
    return size.get(task, 0) if isinstance(size, dict) else size


def task_rng(seed: int, split: str, task: str) -> random.Random:
    """The stream one (split, task) draws from; str seeds hash the same in every run and platform."""
    return random.Random(f"ovis25.synth/{seed}/{split}/{task}")


def fingerprint(image: Image.Image) -> bytes:
    return hashlib.sha1(repr(image.size).encode() + image.tobytes()).digest()


def pair_kind(u: float) -> str:
    """The kind of preference pair a uniform draw u in [0, 1) falls on (PAIR_KINDS in order)."""
    for kind, share in PAIR_KINDS.items():
        if u < share:
            return kind
        u -= share
    return kind  # rounding at the top end


def record(split: str, sid: str, sample: Sample, paths: list[str], rng: random.Random) -> dict:
    """One line of the split's file, in the official field names."""
    visuals = {"video_frames": paths} if sample.video else {"image": paths[0] if len(paths) == 1 else paths}
    prompt = [{"from": "human", "value": sample.prompt}]
    if split == "caption":
        return {"id": sid, **visuals, "caption": sample.caption}
    head = {"id": sid, "task": sample.task, **visuals}
    if split == "qa":
        return {**head, "conversations": prompt + [{"from": "gpt", "value": sample.answer}]}
    if split == "think":
        answer = thinking(sample, self_correct=rng.random() < SELF_CORRECT)
        return {**head, "conversations": prompt + [{"from": "gpt", "value": answer}]}
    if split == "dpo":
        kind = pair_kind(rng.random())
        if kind == "answer":
            chosen, rejected = sample.answer, sample.wrong
        else:
            chosen = thinking(sample)
            rejected = misled_thinking(sample) if kind == "misled" else unfaithful_thinking(sample)
        return {**head, "kind": kind, "conversations": prompt, "chosen": chosen, "rejected": rejected}
    if split == "grpo":
        return {**head, "conversations": prompt, "answer": sample.answer, "reward": sample.metric}
    return {**head, "question": sample.question, "conversations": prompt, "answer": sample.answer,
            "metric": sample.metric, "category": question_category(sample)}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_part(tmp: Path, seed: int, split: str, task: str, n: int, avoid: frozenset[bytes]
               ) -> tuple[list[dict], set[bytes], int]:
    """The `n` samples of one (split, task) stream, their images written under `tmp` -> (rows, fingerprints
    of their images, images written). A sample with an image in `avoid` is drawn again."""
    rng = task_rng(seed, split, task)
    rows, seen, n_images = [], set(), 0
    for i in range(n):
        sample = DRAWS[task](rng)
        keys = [fingerprint(im) for im in sample.images]
        while any(k in avoid for k in keys):
            sample = DRAWS[task](rng)
            keys = [fingerprint(im) for im in sample.images]
        seen.update(keys)
        sid = f"{split}-{task}-{i:05d}"
        paths = [f"{split}/{task}/{sid}.png"] if len(sample.images) == 1 else \
                [f"{split}/{task}/{sid}_{k}.png" for k in range(len(sample.images))]
        for image, path in zip(sample.images, paths):
            (tmp / IMAGE_DIR / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp / IMAGE_DIR / path, format="PNG", compress_level=1)  # flat colours: fast zlib does
        n_images += len(paths)
        rows.append(record(split, sid, sample, paths, rng))
    return rows, seen, n_images


def run_parts(jobs: list[tuple], workers: int | None = None) -> Iterator[tuple[list[dict], set[bytes], int]]:
    """`build_part(*job)` for every job, in order; on `workers` processes (default: one per CPU) when there is
    more than one."""
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        yield from (build_part(*job) for job in jobs)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        yield from (future.result() for future in [pool.submit(build_part, *job) for job in jobs])


def visual_paths(row: dict) -> list[str]:
    """A record's image paths (relative to the world's image folder), frames of a video included."""
    paths = row.get("video_frames") or row.get("image") or []
    return [paths] if isinstance(paths, str) else list(paths)


def training_fingerprints(world_dir: Path, manifest: dict, progress: bool = False) -> set[bytes]:
    """The fingerprints of every image a built world (its manifest given) trains on: every split but the
    held-out one."""
    rows = [row for spec in manifest["datasets"].values()
            for row in json.loads((world_dir / spec["meta_file"]).read_text())]
    rows += [json.loads(line) for split, name in manifest["files"].items() if split != "test"
             for line in (world_dir / name).read_text().splitlines()]
    paths = sorted({p for row in rows for p in visual_paths(row)})
    root = world_dir / manifest["image_dir"]
    return {fingerprint(Image.open(root / p)) for p in tqdm(paths, desc="training images", disable=not progress)}


def build_heldout(world_dir: str | Path, out_dir: str | Path, per_task: int, tasks: Sequence[str] | None = None,
                  progress: bool = False, workers: int | None = None) -> dict:
    """A larger held-out split for a built world: its test streams drawn on to `per_task` items a task, so the
    world's own test items come first, unchanged, and no new image equals a training image either. Written as
    `out_dir/test.jsonl` with images under `out_dir/images` (what `ovis25 eval --suite synth --world out_dir`
    reads) and `out_dir/heldout.json`; the world itself, its tokenizer included, is left as it is."""
    world, out = Path(world_dir), Path(out_dir)
    if not (world / "world.json").is_file():
        raise ValueError(f"{world}: not a synthetic world (no world.json; python -m ovis25.synth OUT builds one)")
    manifest = json.loads((world / "world.json").read_text())
    tasks = list(manifest["tasks"] if tasks is None else tasks)
    unknown = [t for t in tasks if t not in manifest["tasks"]]
    if unknown or not tasks:
        raise ValueError(f"tasks: unknown or none {unknown or tasks}; {world} holds {manifest['tasks']}")
    if per_task < 1:
        raise ValueError(f"per_task must be at least 1, got {per_task}")
    if out.resolve() == world.resolve():
        raise ValueError(f"{out}: write the held-out split beside the world, not over it")
    if out.exists() and any(out.iterdir()) and not (out / "heldout.json").exists():
        raise FileExistsError(f"{out}: not empty and not a held-out split; refusing to replace it")
    avoid = frozenset(training_fingerprints(world, manifest, progress))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows, counts = [], {}
    jobs = [(tmp, manifest["seed"], "test", task, per_task, avoid) for task in tasks]
    with tqdm(total=per_task * len(tasks), desc="held-out split", unit="sample", disable=not progress) as bar:
        for task, (part, _, _) in zip(tasks, run_parts(jobs, workers)):
            rows += part
            counts[task] = len(part)
            bar.update(len(part))
    write_jsonl(tmp / "test.jsonl", rows)
    info = {"world": str(world), "seed": manifest["seed"], "per_task": per_task, "tasks": tasks, "counts": counts,
            "files": {"test": "test.jsonl"}, "image_dir": IMAGE_DIR}
    write_json(tmp / "heldout.json", info)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return info


def build_world(out_dir: str | Path, seed: int = 0, sizes: dict | str = "tiny", tokenizer: bool = True,
                progress: bool = False, tasks: Sequence[str] | None = None, workers: int | None = None) -> dict:
    """Generate every split, write it under `out_dir` (replacing a previous world there) and return the
    manifest that is also written to `out_dir/world.json`. `sizes` is a preset name or {split: samples per
    task}; `tokenizer` also trains the world's BPE into `out_dir/tokenizer`; `tasks` limits the world to
    those tasks (each task draws from its own stream, so its samples are the same as in a full world), which
    may include the warm-ups (`world.WARMUPS`), never drawn by default;
    `workers` processes draw the streams (default: one per CPU; the files are the same for any number)."""
    sizes = resolve_sizes(sizes)
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in DRAWS]
    if unknown or not tasks:
        raise ValueError(f"tasks: unknown or none {unknown or tasks}; tasks are {list(DRAWS)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "world.json").exists():
        raise FileExistsError(f"{out}: not empty and not a synthetic world; refusing to replace it")
    tmp = out.with_name(f".{out.name}.tmp")  # built aside and renamed, so a crash leaves no half world
    shutil.rmtree(tmp, ignore_errors=True)

    plan = [(split, task) for split in SPLITS for task in tasks
            if split_size(sizes, split, task) and (split != "caption" or task in CAPTIONED)]
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    n_images = 0
    with tqdm(total=sum(split_size(sizes, s, t) for s, t in plan), desc="synthetic world", unit="sample",
              disable=not progress) as bar:
        train_images: set[bytes] = set()
        # the test streams go last: none of their images may equal a training image
        for stage in ([p for p in plan if p[0] != "test"], [p for p in plan if p[0] == "test"]):
            avoid = frozenset(train_images)
            jobs = [(tmp, seed, split, task, split_size(sizes, split, task), avoid if split == "test" else frozenset())
                    for split, task in stage]
            for (split, task), (part, keys, images) in zip(stage, run_parts(jobs, workers)):
                rows[split] += part
                counts[split][task] = len(part)
                if split != "test":
                    train_images |= keys
                n_images += images
                bar.update(len(part))

    datainfo = {}
    for name, (split, data_format) in DATASETS.items():
        datainfo[name] = {"meta_file": f"meta/{split}.json", "image_dir": IMAGE_DIR, "data_format": data_format}
        if data_format == "caption":
            datainfo[name]["caption_template"] = CAPTION_TEMPLATE
        write_json(tmp / datainfo[name]["meta_file"], rows[split])
    write_json(tmp / "datainfo.json", datainfo)
    for split in ("dpo", "grpo", "test"):
        write_jsonl(tmp / f"{split}.jsonl", rows[split])

    manifest = {
        "seed": seed, "sizes": sizes, "tasks": tasks, "datainfo": "datainfo.json", "image_dir": IMAGE_DIR,
        "datasets": {name: {"meta_file": datainfo[name]["meta_file"], "data_format": fmt, "samples": len(rows[split])}
                     for name, (split, fmt) in DATASETS.items()},
        "files": {split: f"{split}.jsonl" for split in ("dpo", "grpo", "test")},
        "phases": PHASES, "counts": counts, "samples": {split: len(rows[split]) for split in SPLITS},
        "images": n_images,
    }
    if tokenizer:
        manifest["tokenizer"] = "tokenizer"
    write_json(tmp / "world.json", manifest)
    if tokenizer:
        from .tokenizer import train_tokenizer, world_corpus
        train_tokenizer(world_corpus(tmp), tmp / "tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest
