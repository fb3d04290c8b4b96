"""A cache of a frozen ViT's output, one entry per image.

When a phase leaves the ViT frozen (the demo's P2-P5, LLM-only or LoRA fine-tuning, GRPO), the encoder's
output for an image never changes, yet the image goes through it again on every pass over the data, for both
responses of a DPO pair and for every rollout of a GRPO group. The cache keys each image by its pixel rows and
grid, runs the ViT on the images it has not seen (packed, as before) and serves the rest from memory. The
visual head, the VET and the LLM still run on every call, so their gradients are unchanged.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn


class FrozenVisionCache:
    """Callable as `cache(vit, pixel_values, grid_thws)` -> the ViT's output (N, D), from memory where it can.

    Bypassed (the ViT simply runs) while any ViT parameter requires grad, so it can never serve a stale
    output of weights that train. Entries are kept until `max_bytes` is reached; later images are computed
    every time."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
        digest = hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((tuple(grid.tolist()), str(pixels.dtype))).encode())
        return digest.digest()

    def __call__(self, vit: nn.Module, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for p in vit.parameters()):
            return vit(pixel_values, grid_thws)
        rows = grid_thws.prod(dim=-1).tolist()
        chunks = pixel_values.split(rows)
        keys = [self.key(pixels, grid) for pixels, grid in zip(chunks, grid_thws)]
        first = {}  # each image not in memory runs once, however often it repeats in this call
        for i, k in enumerate(keys):
            if k not in self.entries:
                first.setdefault(k, i)
        missing = list(first.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed: dict[bytes, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                out = vit(torch.cat([chunks[i] for i in missing]), grid_thws[missing])
            for i, features in zip(missing, out.split([rows[i] for i in missing])):
                computed[keys[i]] = features
                size = features.numel() * features.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.entries[keys[i]] = features
                    self.bytes += size
        return torch.cat([computed[k] if k in computed else self.entries[k] for k in keys])

    def summary(self) -> str:
        total = self.hits + self.misses
        return (f"{self.hits}/{total} images served from the frozen-ViT cache "
                f"({len(self.entries)} entries, {self.bytes / 2**20:.0f} MiB)")
