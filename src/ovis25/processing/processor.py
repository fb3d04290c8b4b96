"""`Processor`: everything between raw inputs (messages, conversations, images, videos) and model tensors."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .chat import (
    DEFAULT_CHAT_TEMPLATE,
    check_placeholder_counts,
    expand_visual_placeholders,
    format_conversation,
    render_chat_template,
    tokenize_with_placeholders,
    validate_messages,
)
from .image import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageInput, preprocess_image
from .tokenizer import Tokenizer, read_json
from .video import preprocess_video, read_video

# Ovis.chat() defaults; format_conversation / preprocess_* use the preprocess_inputs defaults instead.
CHAT_MIN_PIXELS = 448 * 448
CHAT_MAX_PIXELS = 1792 * 1792

VideoInput = Sequence[ImageInput] | str | os.PathLike


@dataclass
class Processor:
    tokenizer: Tokenizer
    patch_size: int = 16
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    preprocessor_config: dict = field(default_factory=dict)  # as read, so save_pretrained round-trips it

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides) -> "Processor":
        """Read config.json (vit_config geometry), preprocessor_config.json, tokenizer files and the chat
        template (chat_template.json, chat_template.jinja, tokenizer_config.json, else the built-in one)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ValueError(f"{model_dir}: not a directory")
        vit = read_json(model_dir / "config.json").get("vit_config", {})
        pre = read_json(model_dir / "preprocessor_config.json")

        def geometry(name: str, default: int | None = None) -> int:
            value = vit.get(name, pre.get(name, default))
            if value is None:
                raise ValueError(f"{model_dir}: {name} not found in config.json vit_config or preprocessor_config.json")
            return value

        kwargs = dict(
            tokenizer=Tokenizer.from_pretrained(model_dir),
            patch_size=geometry("patch_size"),
            hidden_stride=geometry("hidden_stride"),
            temporal_patch_size=geometry("temporal_patch_size", 1),
            image_mean=tuple(pre.get("image_mean", (0.5,) * 3)) if pre.get("do_normalize", True) else (0.0,) * 3,
            image_std=tuple(pre.get("image_std", (0.5,) * 3)) if pre.get("do_normalize", True) else (1.0,) * 3,
            resample=pre.get("resample", Image.Resampling.BICUBIC),
            rescale_factor=pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0,
            chat_template=_find_chat_template(model_dir),
            preprocessor_config=pre,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write tokenizer files, preprocessor_config.json (with the patch geometry) and chat_template.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        config = dict(
            self.preprocessor_config,
            image_mean=list(self.image_mean), image_std=list(self.image_std), resample=int(self.resample),
            rescale_factor=self.rescale_factor, do_normalize=True, do_rescale=True,
            patch_size=self.patch_size, hidden_stride=self.hidden_stride, temporal_patch_size=self.temporal_patch_size,
        )
        (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")

    # ---- pixels -------------------------------------------------------------------------------------

    def _pixel_kwargs(self) -> dict:
        return dict(patch_size=self.patch_size, hidden_stride=self.hidden_stride,
                    temporal_patch_size=self.temporal_patch_size, mean=self.image_mean, std=self.image_std,
                    resample=self.resample, rescale_factor=self.rescale_factor, max_image_pixels=self.max_image_pixels)

    def preprocess_image(self, image: ImageInput, min_pixels: int = DEFAULT_MIN_PIXELS,
                         max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values (N, 3*tps*ps*ps) float32, grid_thw (1, 3) long."""
        return preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels, name=name, **self._pixel_kwargs())

    def preprocess_video(self, frames: VideoInput, min_pixels: int = DEFAULT_MIN_PIXELS,
                         max_pixels: int = DEFAULT_MAX_PIXELS, num_frames: int = 8,
                         name: str = "video") -> tuple[torch.Tensor, torch.Tensor]:
        """A frame list (or a video file, sampled to `num_frames`) -> pixel_values, grid_thw (1, 3)."""
        if isinstance(frames, (str, os.PathLike)):
            frames = read_video(frames, num_frames)
        return preprocess_video(frames, min_pixels=min_pixels, max_pixels=max_pixels, name=name, **self._pixel_kwargs())

    def _encode_visuals(self, images: Sequence[ImageInput], videos: Sequence[VideoInput], min_pixels: int,
                        max_pixels: int, num_frames: int) -> tuple[torch.Tensor | None, list, list]:
        pixel_values, image_grids, video_grids = [], [], []
        for i, image in enumerate(images):
            pv, grid = self.preprocess_image(image, min_pixels, max_pixels, name=f"image {i}")
            pixel_values.append(pv)
            image_grids.append(grid[0].tolist())
        for i, video in enumerate(videos):
            pv, grid = self.preprocess_video(video, min_pixels, max_pixels, num_frames, name=f"video {i}")
            pixel_values.append(pv)
            video_grids.append(grid[0].tolist())
        return (torch.cat(pixel_values) if pixel_values else None), image_grids, video_grids

    def _finish(self, ids: list[int], labels: list[int] | None, images: Sequence[ImageInput],
                videos: Sequence[VideoInput], min_pixels: int, max_pixels: int, num_frames: int):
        check_placeholder_counts(ids, len(images), len(videos))  # before any pixel work
        pixel_values, image_grids, video_grids = self._encode_visuals(images, videos, min_pixels, max_pixels,
                                                                      num_frames)
        ids, labels = expand_visual_placeholders(ids, image_grids, video_grids, self.hidden_stride,
                                                 self.temporal_patch_size, labels)
        grids = image_grids + video_grids
        grid_thws = torch.tensor(grids, dtype=torch.long) if grids else None
        return torch.tensor(ids, dtype=torch.long), labels, pixel_values, grid_thws

    # ---- HF-style messages -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, **kwargs) -> str:
        """Render with the checkpoint's template; enable_thinking=None leaves it undefined in jinja."""
        specials = {k: v for k, v in (("eos_token", self.tokenizer.eos_token), ("pad_token", self.tokenizer.pad_token),
                                      ("bos_token", self.tokenizer.bos_token)) if v is not None}
        return render_chat_template(messages, self.chat_template, add_generation_prompt, enable_thinking,
                                    **{**specials, **kwargs})

    def __call__(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                 enable_thinking: bool | None = None, min_pixels: int = CHAT_MIN_PIXELS,
                 max_pixels: int = CHAT_MAX_PIXELS, num_frames: int = 8, **template_kwargs) -> dict:
        """Messages with {"type": "image", "image": PIL|path|bytes} / {"type": "video", "video": frames|path}
        items -> {"input_ids": (1, L), "pixel_values": (N, D) or None, "grid_thws": (n, 3) or None}."""
        text = self.apply_chat_template(messages, add_generation_prompt, enable_thinking, **template_kwargs)
        images, videos = _collect_visuals(messages)
        ids = tokenize_with_placeholders(self.tokenizer, text)
        input_ids, _, pixel_values, grid_thws = self._finish(ids, None, images, videos, min_pixels, max_pixels,
                                                             num_frames)
        return {"input_ids": input_ids[None], "pixel_values": pixel_values, "grid_thws": grid_thws}

    # ---- official from/value conversations -------------------------------------------------------------

    def format_conversation(
        self,
        conversations: Sequence[dict],
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        generation_preface: str | None = None,
        num_frames: int = 8,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The reference preprocess_inputs: -> input_ids (L,), labels (L,), pixel_values or None, grid_thws or None.

        generation_preface=None formats for training (labels on gpt turns); a string (`"<think>\\n\\n</think>\\n\\n"`
        or `""`) ends the prompt with an open assistant turn for generation.
        """
        images, videos = _as_list(images, "images"), _as_list(videos, "videos")
        _, ids, labels = format_conversation(self.tokenizer, conversations, generation_preface)
        input_ids, labels, pixel_values, grid_thws = self._finish(ids, labels, images, videos, min_pixels,
                                                                  max_pixels, num_frames)
        return input_ids, torch.tensor(labels, dtype=torch.long), pixel_values, grid_thws


def _as_list(items, field: str) -> list:
    if items is None:
        return []
    if isinstance(items, (str, bytes, os.PathLike, Image.Image)):
        raise ValueError(f"{field} must be a list (one entry per placeholder), got a single {type(items).__name__}")
    return list(items)


def _collect_visuals(messages: Sequence[dict]) -> tuple[list, list]:
    """Images and videos from content items, in prompt order."""
    validate_messages(messages)
    images, videos = [], []
    for i, message in enumerate(messages):
        if isinstance(message["content"], str):
            continue
        for j, item in enumerate(message["content"]):
            kind = item["type"]
            if kind in ("image", "video"):
                if item.get(kind) is None:
                    raise ValueError(f"message {i} item {j}: a {kind!r} item needs a {kind!r} field")
                (images if kind == "image" else videos).append(item[kind])
    return images, videos


def _find_chat_template(model_dir: Path) -> str:
    template = read_json(model_dir / "chat_template.json").get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = read_json(model_dir / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or DEFAULT_CHAT_TEMPLATE
