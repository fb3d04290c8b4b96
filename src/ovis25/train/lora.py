"""A small built-in LoRA for the plain nn.Linear layers of the LLM and/or the ViT.

Adapted layers keep their own parameter names (`...q_proj.weight` stays the frozen base) and gain
`lora_A` (r, in) and `lora_B` (out, r): y = x W^T + b + (alpha / r) * dropout(x) A^T B^T. B starts at zero,
so training starts from the base model exactly. `merge_lora_state` folds the adapters into the base
weights for export in the official format.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .phases import resolve_module


class LoRALinear(nn.Linear):
    """An nn.Linear whose class was switched in place by `apply_lora` (so state-dict names do not move)."""

    lora_rank: int
    lora_scale: float
    lora_dropout: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scale


def apply_lora(model: nn.Module, targets: str, rank: int, alpha: float, dropout: float = 0.0,
               layer_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj",
                                               "up_proj", "down_proj", "fc1", "fc2"),
               seed: int = 0) -> list[str]:
    """Add adapters to the named Linear layers under each `|`-separated module path; returns their names."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    g = torch.Generator().manual_seed(seed)
    adapted = []
    for path in (p.strip() for p in targets.split("|") if p.strip()):
        root = resolve_module(model, path)
        for name, module in root.named_modules():
            if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] not in layer_names:
                continue
            a = torch.empty(rank, module.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            module.lora_A = nn.Parameter(a.to(module.weight.dtype))
            module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, dtype=module.weight.dtype))
            module.lora_rank, module.lora_scale, module.lora_dropout = rank, alpha / rank, dropout
            module.__class__ = LoRALinear
            adapted.append(f"{path}.{name}")
    if not adapted:
        raise ValueError(f"lora_targets {targets!r} contain no Linear layer named one of {layer_names}")
    return adapted


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


@torch.no_grad()
def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with W <- W + scale * B @ A for every adapter, and no lora_* entries."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            w = merged[f"{prefix}.weight"]
            delta = (state[f"{prefix}.lora_B"].float() @ state[key].float()) * scale
            merged[f"{prefix}.weight"] = (w.float() + delta).to(w.dtype)
    return merged
