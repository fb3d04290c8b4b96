"""Training data in the official Ovis dataset format.

A *datainfo* JSON names datasets: `{"name": {"meta_file": ..., "image_dir": ..., "data_format":
"conversation" | "caption", "caption_template": ...}}`. A meta file is a JSON list (or JSONL) of samples:
`conversations` (`from`/`value`, `<image>`/`<video>` placeholders) with `image` (path or list), `video`
(file) or `video_frames` (list of paths); caption samples carry `image` and `caption`.

Work is split in two so packing can be planned without decoding pixels: `plan()` tokenizes the text
and reads only image headers to get each sample's exact length; `build()` (run lazily, in DataLoader
workers) decodes and preprocesses the pixels.
"""
from __future__ import annotations

import json
import logging
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..constants import IGNORE_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from ..processing import PixelBudgets, Processor, media_kind, read_video, smart_resize
from ..processing.chat import expand_visual_placeholders, format_conversation, num_visual_atoms

log = logging.getLogger(__name__)
DEFAULT_CAPTION_TEMPLATE = "<image>\nDescribe the image."


class DataError(ValueError):
    """A bad sample; `reason` is a short key used to count skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class DatasetSpec:
    name: str
    meta_file: Path
    image_dir: Path
    data_format: str = "conversation"
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    ratio: float = 1.0  # share of the mixture (samples drawn with replacement when > the dataset size)


def dataset_entry(entry: str) -> tuple[str, float]:
    """One of a recipe's `datasets` entries, `name` or `name:ratio`, as (name, mixture weight; 1 when not given)."""
    name, _, ratio = entry.partition(":")
    return name, float(ratio) if ratio else 1.0


def load_datainfo(path: str | Path, names: list[str] | None = None,
                  formats: tuple[str, ...] = ("conversation", "caption")) -> list[DatasetSpec]:
    """Datasets from a datainfo JSON; `names` entries may be `name` or `name:ratio` (mixture weight);
    `formats`: the data formats the caller accepts."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"datainfo {path}: cannot read ({e})") from None
    wanted = [dataset_entry(n) for n in names] if names else [(n, 1.0) for n in info]
    specs = []
    for name, ratio in wanted:
        if name not in info:
            raise ValueError(f"datainfo {path}: no dataset named {name!r} (have {sorted(info)})")
        entry = info[name]
        for key in ("meta_file", "data_format"):
            if key not in entry:
                raise ValueError(f"datainfo {path}: dataset {name!r} lacks {key!r}")
        if entry["data_format"] not in formats:
            raise ValueError(f"datainfo {path}: dataset {name!r} has data_format {entry['data_format']!r}; "
                             f"expected one of {formats}")
        resolve = lambda p: (path.parent / p) if not Path(p).is_absolute() else Path(p)  # noqa: E731
        specs.append(DatasetSpec(name, resolve(entry["meta_file"]), resolve(entry.get("image_dir", ".")),
                                 entry["data_format"], entry.get("caption_template") or DEFAULT_CAPTION_TEMPLATE,
                                 ratio))
    return specs


def read_samples(meta_file: str | Path) -> list[dict | DataError]:
    """A JSON list or JSONL file. A malformed JSONL line becomes a DataError naming its line number, in
    place of the sample, so one bad line costs one sample; a malformed JSON list fails as a whole."""
    meta_file = Path(meta_file)
    try:
        text = meta_file.read_text()
    except OSError as e:
        raise DataError("missing_file", f"cannot read {meta_file}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError("malformed_json", f"{meta_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        samples = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    samples.append(DataError("malformed_json", f"{meta_file}: line {n}: invalid JSON ({e.msg})"))
    return [s if isinstance(s, (dict, DataError)) else DataError("malformed_json", f"{meta_file}: sample {i} is "
                                                                 "not a JSON object") for i, s in enumerate(samples)]


@dataclass
class TrainSample:
    input_ids: torch.Tensor              # (L,) with official negative ids
    labels: torch.Tensor                 # (L,) IGNORE_ID outside assistant turns
    pixel_values: torch.Tensor | None    # (N, D)
    grid_thws: torch.Tensor | None       # (n, 3)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(slots=True)
class PlannedSample:
    dataset: str
    index: int
    length: int
    # array("i"), not lists: a plan holds every sample's tokens for the whole run (8 bytes a token, not ~45)
    input_ids: array
    labels: array
    visuals: list[tuple[str, Path | list[Path]]]  # ("image", path) | ("frames", [paths]) | ("video", file)
    kind: str                            # single_image | multiple_image | video | text

    def token_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) as int64 tensors."""
        return _int64(self.input_ids), _int64(self.labels)


def _int64(values: array) -> torch.Tensor:
    # frombuffer reads the array's memory (20x faster than torch.tensor) but refuses an empty one
    return torch.frombuffer(values, dtype=torch.int32).long() if values else torch.zeros(0, dtype=torch.long)


@dataclass
class SkipStats:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, err: DataError, where: str) -> None:
        self.counts[err.reason] += 1
        self.examples.setdefault(err.reason, f"{where}: {err}")
        log.warning("skipping %s: %s", where, err)

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        return "skipped " + ", ".join(f"{n} {r} (e.g. {self.examples[r]})" for r, n in self.counts.items())


class SampleBuilder:
    """Turns raw samples into token ids, labels and (lazily) pixels, with the official rules."""

    def __init__(self, processor: Processor, budgets: PixelBudgets, max_length: int, on_error: str = "skip",
                 num_frames: int = 8):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        self.processor, self.budgets, self.max_length, self.on_error = processor, budgets, max_length, on_error
        self.num_frames = num_frames
        self.skips = SkipStats()

    def conversations(self, sample: dict, spec: DatasetSpec) -> list[dict]:
        if spec.data_format == "caption":
            if not isinstance(sample.get("caption"), str):
                raise DataError("bad_sample", "caption sample without a 'caption' string")
            return [{"from": "human", "value": spec.caption_template}, {"from": "gpt", "value": sample["caption"]}]
        conv = sample.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise DataError("bad_sample", "sample without a non-empty 'conversations' list")
        return conv

    @staticmethod
    def visual_paths(sample: dict, spec: DatasetSpec) -> tuple[list[Path], list[list[Path]]]:
        images = sample.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        videos = []
        if sample.get("video_frames"):
            videos.append([spec.image_dir / f for f in sample["video_frames"]])
        elif sample.get("video"):
            videos.append(spec.image_dir / sample["video"])
        return [spec.image_dir / p for p in images], videos

    def _grid(self, size: tuple[int, int], frames: int, kind: str, where: str) -> list[int]:
        lo, hi = self.budgets.for_kind(kind)
        p = self.processor.patch_size
        h, w = smart_resize(size[1], size[0], p * self.processor.hidden_stride, lo, hi)
        if h == 0 or w == 0:
            raise DataError("bad_image", f"{where}: {size[0]}x{size[1]} resizes to a zero side under budget {lo}..{hi}")
        return [frames, h // p, w // p]

    @staticmethod
    def _size(path: Path) -> tuple[int, int]:
        """(width, height) from the file's header (planning reads the size of every image in the data)."""
        try:
            with open(path, "rb") as f:
                head = f.read(24)
        except FileNotFoundError:
            raise DataError("missing_image", f"image file not found: {path}") from None
        except OSError as e:
            raise DataError("corrupt_image", f"cannot read image {path}: {e}") from None
        if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":  # a PNG starts with its size: 10x faster than PIL
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        try:
            with Image.open(path) as im:
                return im.size
        except Exception as e:  # PIL raises many types for bad files
            raise DataError("corrupt_image", f"cannot read image {path}: {e}") from None

    def _read_video(self, path: Path) -> list[Image.Image]:
        if not path.exists():
            raise DataError("missing_image", f"video file not found: {path}")
        try:
            return read_video(path, self.num_frames)
        except ValueError as e:
            raise DataError("corrupt_image", str(e)) from None

    def plan(self, sample: dict, spec: DatasetSpec, index: int,
             generation_preface: str | None = None) -> PlannedSample:
        """Token ids and labels with visual blocks expanded, from image headers only.

        With a `generation_preface` the sample is a generation prompt (RL rollouts): it ends with an open
        assistant turn, has no labels, and is never truncated (too long is an error)."""
        conv = self.conversations(sample, spec)
        images, videos = self.visual_paths(sample, spec)
        try:
            _, ids, labels = format_conversation(self.processor.tokenizer, conv, generation_preface)
        except ValueError as e:
            raise DataError("bad_sample", str(e)) from None
        n_img, n_vid = ids.count(IMAGE_TOKEN_ID), ids.count(VIDEO_TOKEN_ID)
        if n_img != len(images) or n_vid != len(videos):
            raise DataError("placeholder_mismatch", f"{n_img} <image> / {n_vid} <video> placeholders but "
                                                    f"{len(images)} image(s) / {len(videos)} video(s)")
        kind = media_kind(len(images), len(videos))
        image_grids = [self._grid(self._size(p), 1, kind, str(p)) for p in images]
        video_grids = []
        for v in videos:
            if isinstance(v, list):
                video_grids.append(self._grid(self._size(v[0]), len(v), kind, str(v[0])))
            else:  # a video file: decode once here to learn its sampled frame count and size
                frames = self._read_video(v)
                video_grids.append(self._grid(frames[0].size, len(frames), kind, str(v)))
        ids, labels = expand_visual_placeholders(ids, image_grids, video_grids, self.processor.hidden_stride,
                                                 self.processor.temporal_patch_size, labels)
        if len(ids) > self.max_length:
            if generation_preface is not None:
                raise DataError("too_long", f"prompt of {len(ids)} tokens leaves no room for the response "
                                            f"(limit {self.max_length})")
            ids, labels = self._truncate(ids, labels)
        if generation_preface is None and all(label == IGNORE_ID for label in labels[1:]):
            raise DataError("no_labels", "no supervised tokens")
        visuals = [("image", p) for p in images] + [("frames" if isinstance(v, list) else "video", v) for v in videos]
        return PlannedSample(spec.name, index, len(ids), array("i", ids), array("i", labels), visuals, kind)

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Cut the tail to max_length; never cut a visual block (then the sample is dropped)."""
        last_visual = max((i for i, t in enumerate(ids) if t < 0), default=-1)
        if last_visual >= self.max_length:
            raise DataError("too_long", f"{len(ids)} tokens with visual tokens beyond max_length {self.max_length}")
        return ids[:self.max_length], labels[:self.max_length]

    def build(self, planned: PlannedSample) -> TrainSample:
        """Decode and preprocess the pixels of a planned sample."""
        pixel_values, grids = [], []
        lo, hi = self.budgets.for_kind(planned.kind) if planned.visuals else (0, 0)
        for i, (what, v) in enumerate(planned.visuals):
            try:
                if what != "image":
                    frames = v if what == "frames" else self._read_video(v)
                    pv, g = self.processor.preprocess_video(frames, lo, hi, name=f"{planned.dataset}[{planned.index}] video")
                else:
                    pv, g = self.processor.preprocess_image(v, lo, hi, name=f"{planned.dataset}[{planned.index}] image {i}")
            except ValueError as e:
                raise DataError("corrupt_image", str(e)) from None
            pixel_values.append(pv)
            grids.append(g)
        atoms = sum(num_visual_atoms(g[0].tolist(), self.processor.hidden_stride, self.processor.temporal_patch_size)
                    for g in grids)
        if atoms != planned.input_ids.count(-300):
            raise DataError("corrupt_image", f"{planned.dataset}[{planned.index}]: pixels give {atoms} visual tokens, "
                                             f"the plan expected {planned.input_ids.count(-300)}")
        return TrainSample(*planned.token_tensors(),
                           torch.cat(pixel_values) if pixel_values else None,
                           torch.cat(grids) if grids else None)


def prompt_turns(sample: dict) -> list[dict]:
    """The prompt of a preference / RL sample: official `conversations` ending with a human turn, or a
    `question` string (one human turn, `<image>` placeholders allowed)."""
    conv = sample.get("conversations")
    if conv is None and isinstance(sample.get("question"), str) and sample["question"].strip():
        return [{"from": "human", "value": sample["question"]}]
    if not isinstance(conv, list) or not conv:
        raise DataError("bad_prompt", "no prompt: need a non-empty 'conversations' list or a 'question' string")
    if not isinstance(conv[-1], dict) or conv[-1].get("from") != "human":
        raise DataError("bad_prompt", "the prompt's last turn must be from 'human'")
    return conv


def plan_datasets(specs: list[DatasetSpec], builder: SampleBuilder, seed: int, plan=None) -> list:
    """Plan every sample of a mixture; a dataset with ratio r contributes round(r * its size) samples.

    `plan(sample, spec, index)` (default `builder.plan`) turns one raw sample into a planned item or raises
    DataError; errors are counted with the sample's id (or fail the run, per the builder's `on_error`)."""
    plan = plan or builder.plan
    rng = random.Random(seed)
    planned: list[PlannedSample] = []
    for spec in specs:
        try:
            samples = read_samples(spec.meta_file)
        except DataError as e:
            if builder.on_error == "fail":
                raise
            builder.skips.add(e, str(spec.meta_file))
            continue
        ok = []
        for i, s in enumerate(samples):
            try:
                if isinstance(s, DataError):
                    raise s
                ok.append(plan(s, spec, i))
            except DataError as e:
                where = f"{spec.name}[{i}]" + (f" (id {s.get('id')})" if isinstance(s, dict) else "")
                if builder.on_error == "fail":
                    raise DataError(e.reason, f"{where}: {e}") from None
                builder.skips.add(e, where)
        want = round(spec.ratio * len(ok))
        if want <= len(ok):
            planned += rng.sample(ok, want) if want < len(ok) else ok
        else:
            planned += ok + [rng.choice(ok) for _ in range(want - len(ok))]
    if not planned:
        raise ValueError(f"no usable training samples ({builder.skips.summary()})")
    return planned
