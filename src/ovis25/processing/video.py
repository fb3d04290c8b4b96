"""Video clips: frame lists -> pixel_values, and uniform frame sampling from a file with PyAV."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .image import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageInput,
    check_budget,
    check_geometry,
    load_image,
    patchify,
    resize_frames,
)

# The official Ovis2.5 video example: 8 uniformly sampled frames, each resized within max_pixels=896*896
# (min_pixels stays at its default).
VIDEO_NUM_FRAMES = 8
VIDEO_MAX_PIXELS = 896 * 896


def preprocess_video(
    frames: Sequence[ImageInput],
    patch_size: int = 16,
    hidden_stride: int = 2,
    temporal_patch_size: int = 1,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    resample: int = Image.Resampling.BICUBIC,
    rescale_factor: float = 1 / 255,
    name: str = "video",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip -> (pixel_values (t*h*w, 3*tps*ps*ps), grid_thw (1, 3) = [[t, h, w]]).

    Every frame is resized to the size the rule gives for the first frame; the clip is padded with its
    last frame up to a multiple of temporal_patch_size.
    """
    if isinstance(frames, (str, bytes, os.PathLike, Image.Image)) or not isinstance(frames, Sequence) or not frames:
        raise ValueError(f"{name}: expected a non-empty list of frames (use read_video() for a file)")
    check_geometry(patch_size, hidden_stride, temporal_patch_size)
    check_budget(min_pixels, max_pixels)
    loaded = [load_image(frame, max_image_pixels, f"{name} frame {i}") for i, frame in enumerate(frames)]
    resized = resize_frames(loaded, patch_size * hidden_stride, min_pixels, max_pixels, resample, name)
    return patchify(resized, patch_size, hidden_stride, temporal_patch_size, mean, std, rescale_factor)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over [0, total), first and last frame included."""
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()  # step > 1: no duplicates


def read_video(path: str | os.PathLike, num_frames: int = VIDEO_NUM_FRAMES) -> list[Image.Image]:
    """Decode a video file and return `num_frames` uniformly sampled RGB frames (all if it has fewer)."""
    try:
        import av
    except ImportError as e:
        raise ImportError("reading video files needs PyAV: `pip install av` (or `pip install ovis25[video]`)") from e
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")

    def decode(wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
        """Decode the whole stream, keeping only frames in `wanted`; also return the decoded count."""
        kept, count = {}, 0
        try:
            with av.open(os.fspath(path)) as container:
                if not container.streams.video:
                    raise ValueError(f"video {os.fspath(path)!r}: the file has no video stream")
                for frame in container.decode(container.streams.video[0]):
                    if count in wanted:
                        kept[count] = frame.to_image()  # RGB
                    count += 1
        except (av.FFmpegError, OSError) as e:
            raise ValueError(f"video {os.fspath(path)!r}: cannot decode: {e}") from e
        return kept, count

    # Use the container's frame count when it has one; it can be wrong, so fall back to a counting pass.
    try:
        with av.open(os.fspath(path)) as container:
            total = container.streams.video[0].frames if container.streams.video else 0
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"video {os.fspath(path)!r}: cannot open: {e}") from e
    if total <= 0:
        _, total = decode(set())
    indices = sample_indices(total, num_frames)
    kept, count = decode(set(indices))
    if count != total:  # metadata was wrong: sample again over the real count
        indices = sample_indices(count, num_frames)
        kept, count = decode(set(indices))
    if not kept:
        raise ValueError(f"video {os.fspath(path)!r}: no frames could be decoded")
    return [kept[i] for i in indices]
