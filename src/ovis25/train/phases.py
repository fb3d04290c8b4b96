"""The training curriculum: which parameters each phase trains, and at which learning rate.

Trainable modules use the official syntax: `llm:2e-5|visual_tokenizer|vte` — module paths separated by
`|`, each with an optional `:lr` overriding the base learning rate. Paths are attribute paths into the
model; negative list indices count from the end (`visual_tokenizer.vit.vision_model.encoder.layers.-1`
is the last ViT block) and `*` stands for every entry of a list (`llm.model.layers.*.self_attn.q_norm:3e-2`:
every LLM layer's query norm at its own rate). `all` selects the whole model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..model.llm import Attention

LAST_VIT_BLOCK = "visual_tokenizer.vit.vision_model.encoder.layers.-1"

# Phase presets (Ovis2.5 report, section 3): P1 trains only the last ViT block, the head and the VET.
PHASES = {
    "p1": {"train_modules": f"{LAST_VIT_BLOCK}|visual_tokenizer.head|vte", "pixels": (448 * 448, 896 * 896),
           "data_format": "caption"},
    "p2": {"train_modules": "all", "pixels": (448 * 448, 1792 * 1792), "data_format": "conversation"},
    "p3": {"train_modules": "all", "pixels": (448 * 448, 1792 * 1792), "data_format": "conversation"},
}


def resolve_modules(model: nn.Module, path: str) -> list[nn.Module]:
    """The modules a path names: one, or one per list entry where a part is `*`."""
    modules = [model]
    for part in path.split("."):
        modules = [child for module in modules for child in _children(module, part, path)]
    return modules


def _children(module: nn.Module, part: str, path: str) -> list[nn.Module]:
    is_list = isinstance(module, (nn.ModuleList, nn.Sequential))
    if is_list and part == "*":
        return list(module)
    if is_list and part.lstrip("-").isdigit():
        index = int(part)
        if not -len(module) <= index < len(module):
            raise ValueError(f"train_modules: index {index} out of range in {path!r}")
        return [module[index]]
    if hasattr(module, part) and isinstance(getattr(module, part), nn.Module):
        return [getattr(module, part)]
    raise ValueError(f"train_modules: {path!r} does not name a module of the model (failed at {part!r})")


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    modules = resolve_modules(model, path)
    if len(modules) != 1:
        raise ValueError(f"{path!r} names {len(modules)} modules; one is needed here")
    return modules[0]


def parse_train_modules(spec: str, base_lr: float) -> list[tuple[str, float]]:
    entries = []
    for item in spec.split("|"):
        item = item.strip()
        if not item:
            continue
        path, _, lr = item.partition(":")
        try:
            entries.append((path.strip(), float(lr) if lr else base_lr))
        except ValueError:
            raise ValueError(f"train_modules: bad learning rate {lr!r} in {item!r}") from None
    if not entries:
        raise ValueError("train_modules selects nothing")
    return entries


def freeze_all(model: nn.Module) -> dict[str, float]:
    for p in model.parameters():
        p.requires_grad_(False)
    return {}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, frozen, eval-mode copy (the DPO/GRPO reference policy)."""
    ref = copy.deepcopy(model).eval()
    freeze_all(ref)
    return ref


def select_trainable(model: nn.Module, spec: str, base_lr: float) -> dict[str, float]:
    """Freeze everything, unfreeze the named modules; returns {parameter name: learning rate}."""
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = freeze_all(model)
    for path, lr in parse_train_modules(spec, base_lr):
        modules = [model] if path == "all" else resolve_modules(model, path)
        for p in (p for module in modules for p in module.parameters()):
            p.requires_grad_(True)
            lrs[names[id(p)]] = lr  # later entries win, so `all|vte:1e-3` gives the VET its own rate
    # post_layernorm is stored in checkpoints but never used (no gradient): keep it out of the optimizer and DDP
    for name, p in model.visual_tokenizer.vit.vision_model.post_layernorm.named_parameters():
        p.requires_grad_(False)
        lrs.pop(f"visual_tokenizer.vit.vision_model.post_layernorm.{name}", None)
    return lrs


def param_groups(model: nn.Module, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """AdamW groups by (learning rate, decay): no decay for biases, norms and embedding tables."""
    groups: dict[tuple[float, float], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if name not in lrs or id(p) in seen:
            continue
        seen.add(id(p))
        no_decay = p.ndim < 2 or "norm" in name or "embed" in name or name.startswith("vte")
        key = (lrs[name], 0.0 if no_decay else weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


@torch.no_grad()
def sharpen_visual_tokens(model: nn.Module, factor: float) -> None:
    """Every visual token logit times `factor` (> 0): the head's LayerNorm weight and bias scaled alike."""
    norm = model.visual_tokenizer.head[-1]
    norm.weight.mul_(factor)
    norm.bias.mul_(factor)


class QKNormPhaseIn:
    """Phases the LLM's QK-norm in: while attached, each query and key is (1 - blend) * gain * x + blend *
    RMSNorm(x) (with the gain), so below blend 1 their lengths are free and attention can sharpen as it must for
    a look-up; at 1 (or once removed) it is Qwen3's. Forward hooks only: weights and checkpoints are untouched."""

    def __init__(self, model: nn.Module):
        self.blend = 0.0
        self.handles = [norm.register_forward_hook(self._mix) for module in model.modules()
                        if isinstance(module, Attention) for norm in (module.q_norm, module.k_norm)]

    def _mix(self, norm: nn.Module, args: tuple[torch.Tensor], normalised: torch.Tensor) -> torch.Tensor:
        if self.blend >= 1:
            return normalised
        return self.blend * normalised + (1 - self.blend) * norm.weight * args[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def reinit_vet(model: nn.Module, mean: float, std: float, seed: int) -> None:
    """P1 starts from a freshly drawn visual embedding table."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = model.vte.weight
    w.copy_(torch.randn(w.shape, generator=g).mul_(std).add_(mean).to(w.dtype))
