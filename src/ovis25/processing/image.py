"""Image loading, the smart_resize rule and patchification into the official pixel_values layout."""
from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[Image.Image, str, os.PathLike, bytes]

# Same number as Pillow's default, but enforced here explicitly so callers can tighten or relax it.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# Defaults of the reference preprocess_inputs; Ovis.chat() uses (448*448, 1792*1792).
DEFAULT_MIN_PIXELS = 448 * 448
DEFAULT_MAX_PIXELS = 1344 * 1792


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w), multiples of `factor`, as the reference computes it.

    A side can come out 0 when the pixel budget is too small for the aspect ratio; that is returned as is
    (the reference then crashes in PIL) and callers that resize must reject it.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be > 0, got {height}x{width}")
    check_budget(min_pixels, max_pixels)
    if factor <= 0:
        raise ValueError(f"smart_resize: factor must be > 0, got {factor}")

    if height < factor or width < factor:  # scale the short side up to one factor
        if height < width:
            width, height = round(factor / height * width), factor
        else:
            height, width = round(factor / width * height), factor
    elif max(height, width) / min(height, width) > 200:  # clamp extreme aspect ratios to 200:1
        if height > width:
            height = 200 * width
        else:
            width = 200 * height

    h, w = round(height / factor) * factor, round(width / factor) * factor  # round half to even, like Python
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def media_kind(images: int, videos: int) -> str:
    """The kind of a sample by its media, as the official per-kind budgets name it: single_image,
    multiple_image, video, or text (no media)."""
    return "video" if videos else "multiple_image" if images > 1 else "single_image" if images else "text"


@dataclass
class PixelBudgets:
    """Per-kind (min, max) resize budgets of each image or video frame, named as the official training
    arguments. A model sees at evaluation what it was trained on when both use the same budgets."""

    single_image_min_pixels: int = 448 * 448
    single_image_max_pixels: int = 1792 * 1792
    multiple_image_min_pixels: int = 448 * 448
    multiple_image_max_pixels: int = 896 * 896
    video_min_pixels: int = 448 * 448
    video_max_pixels: int = 448 * 448

    @classmethod
    def uniform(cls, min_pixels: int, max_pixels: int) -> PixelBudgets:
        """One budget for every kind."""
        return cls(min_pixels, max_pixels, min_pixels, max_pixels, min_pixels, max_pixels)

    def for_kind(self, kind: str) -> tuple[int, int]:
        return getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")

    def for_media(self, images: int, videos: int) -> dict[str, int]:
        """{"min_pixels", "max_pixels"} for a sample with these media (text only: the single-image budget)."""
        kind = media_kind(images, videos)
        lo, hi = self.for_kind("single_image" if kind == "text" else kind)
        return {"min_pixels": lo, "max_pixels": hi}


def check_budget(min_pixels: int, max_pixels: int) -> None:
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")


def to_rgb(image: Image.Image) -> Image.Image:
    """Plain PIL mode conversion, as the reference does: RGBA drops alpha, P/L/CMYK/I;16 use PIL's rules."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(
    source: ImageInput, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, name: str = "image"
) -> Image.Image:
    """Open and fully decode an image from a PIL image, a path or encoded bytes.

    Every failure (missing/empty/truncated/non-image file, too many pixels) is a ValueError that starts
    with `name` so the caller can tell which input was bad.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            try:
                with open(source, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ValueError(f"{name}: cannot read file {os.fspath(source)!r}: {e.strerror or e}") from e
        else:
            raise ValueError(f"{name}: expected a PIL image, a path or bytes, got {type(source).__name__}")
        if not data:
            raise ValueError(f"{name}: the image data is empty (0 bytes)")
        try:
            # Our own limit below replaces Pillow's warning; Pillow's hard error (2x its global) still applies.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ValueError(f"{name}: rejected as a decompression bomb by Pillow: {e}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # ValueError: e.g. a broken PPM header
            raise ValueError(f"{name}: not a readable image ({len(data)} bytes): {e}") from e

    width, height = image.size
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds max_image_pixels={max_image_pixels} "
            "(decompression-bomb guard)"
        )
    if width == 0 or height == 0:
        raise ValueError(f"{name}: image has a zero side ({width}x{height})")
    try:
        image.load()  # decode now so truncated files fail here, not later inside resize
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name}: image data is corrupt or truncated: {e}") from e
    return image


def resize_frames(
    frames: Sequence[Image.Image],
    factor: int,
    min_pixels: int,
    max_pixels: int,
    resample: int = Image.Resampling.BICUBIC,
    name: str = "image",
) -> list[Image.Image]:
    """Convert to RGB and resize every frame to the size the rule gives for the first frame."""
    width, height = frames[0].size
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    if h == 0 or w == 0:
        raise ValueError(
            f"{name}: {width}x{height} (WxH) cannot be resized within max_pixels={max_pixels} "
            f"(min_pixels={min_pixels}, factor {factor}): the rule gives {w}x{h}; height and width must be > 0, "
            "raise max_pixels"
        )
    return [to_rgb(frame).resize((w, h), Image.Resampling(resample)) for frame in frames]


def patchify(
    frames: Sequence[Image.Image],
    patch_size: int,
    hidden_stride: int,
    temporal_patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rescale_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise same-size RGB frames and cut them into rows of (C, T, ph, pw) patches.

    Row order: frame group, then hidden_stride x hidden_stride group row-major, then row-major inside the
    group, so consecutive hidden_stride**2 rows form one visual atom.
    """
    pixels = np.stack([np.asarray(frame, dtype=np.uint8) for frame in frames])  # (T, H, W, 3)
    x = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)

    if len(x) % temporal_patch_size:  # pad the clip by repeating its last frame
        pad = temporal_patch_size - len(x) % temporal_patch_size
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    frames_total, height, width, channels = x.shape
    ps, m, tps = patch_size, hidden_stride, temporal_patch_size
    t, gh, gw = frames_total // tps, height // ps, width // ps

    x = x.reshape(t, tps, gh // m, m, ps, gw // m, m, ps, channels)
    # -> t, group row, group col, row in group, col in group, channel, time, patch row, patch col
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    pixel_values = torch.from_numpy(np.ascontiguousarray(x).reshape(t * gh * gw, channels * tps * ps * ps))
    return pixel_values, torch.tensor([[t, gh, gw]], dtype=torch.long)


def preprocess_image(
    image: ImageInput,
    patch_size: int = 16,
    hidden_stride: int = 2,
    temporal_patch_size: int = 1,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    resample: int = Image.Resampling.BICUBIC,
    rescale_factor: float = 1 / 255,
    name: str = "image",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values float32 (N, 3*tps*ps*ps), grid_thw long (1, 3)).

    With temporal_patch_size > 1 the image is repeated to fill one temporal patch.
    """
    check_geometry(patch_size, hidden_stride, temporal_patch_size)
    check_budget(min_pixels, max_pixels)
    image = load_image(image, max_image_pixels, name)
    (resized,) = resize_frames([image], patch_size * hidden_stride, min_pixels, max_pixels, resample, name)
    return patchify([resized], patch_size, hidden_stride, temporal_patch_size, mean, std, rescale_factor)


def check_geometry(patch_size: int, hidden_stride: int, temporal_patch_size: int) -> None:
    for field, value in zip(("patch_size", "hidden_stride", "temporal_patch_size"),
                            (patch_size, hidden_stride, temporal_patch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
