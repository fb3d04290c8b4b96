"""Assemble a fresh Ovis2.5 from a pretrained SigLIP/SigLIP2 checkpoint and a pretrained Qwen3 checkpoint.

Both directories use the Hugging Face layout: config.json plus safetensors (one file, or shards with an
index). The encoder and LLM weights are copied; the visual tokenizer head and the visual embedding table
(VET) have no pretrained counterpart and are freshly initialised, as at the start of Ovis training.

Accepted vision checkpoints:
  SiglipVisionModel / SiglipModel (fixed resolution, e.g. siglip2-so400m-patch16-512): Conv2d patch embedding.
  Siglip2VisionModel / Siglip2Model (NaFlex): Linear patch embedding over (p, p, C)-flattened patches,
  reshaped here to the Conv2d layout, whose rows are channel-major (C, p, p) like our pixel rows.
Tensor names may carry a `vision_model.` prefix (full models, older transformers) or none (transformers 5
saving a vision-only model). SigLIP's attention-pooling head, the text tower and the logit scale/bias are
not used by Ovis and are skipped.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from .checkpoint import CheckpointError, checkpoint_files, read_state_dict
from .config import ConfigError, OvisConfig, Qwen3Config, VisionConfig, read_config_json
from .model import Ovis

VISION_PREFIX = "visual_tokenizer.vit.vision_model."
_VISION_TYPES = {"siglip_vision_model": False, "siglip2_vision_model": True}  # -> is NaFlex
_FULL_TYPES = {"siglip": False, "siglip2": True}
# Source-model fields that would describe the wrong thing in an Ovis `vit_config`.
_VISION_DROP = ("architectures", "model_type", "vision_use_head", "num_patches")
# transformers' defaults for fields a config.json may leave out (older versions save only non-defaults),
# where ours (which follow the released Ovis2.5) differ: a config means what transformers reads from it.
_SIGLIP_HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "patch_size": 16, "image_size": 224}
_QWEN3_HF_DEFAULTS = {"tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 32768}


def _read_config(path: Path, what: str) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"{path}: {what} checkpoint directory not found")
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: no config.json in the {what} checkpoint")
    return read_config_json(path / "config.json")


def vision_config_from_hf(path: Path, **ovis_fields) -> tuple[VisionConfig, bool]:
    """Ovis `vit_config` from a SigLIP/SigLIP2 config.json, and whether the checkpoint is NaFlex."""
    raw = _read_config(path, "vision")
    top = raw.get("model_type")
    if "vision_config" in raw and top in _FULL_TYPES:
        cfg, naflex = raw["vision_config"], _FULL_TYPES[top]
    elif top in _VISION_TYPES:
        cfg, naflex = raw, _VISION_TYPES[top]
    else:
        raise ConfigError(f"{path / 'config.json'}: model_type {top!r} is not a SigLIP/SigLIP2 model "
                          f"(expected one of {sorted(_VISION_TYPES) + sorted(_FULL_TYPES)})")
    data = _SIGLIP_HF_DEFAULTS | {k: v for k, v in cfg.items() if k not in _VISION_DROP}
    if naflex:  # NaFlex has a learned table of num_patches positions (a square grid), no image_size
        n = cfg.get("num_patches", 256)  # transformers' Siglip2VisionConfig default
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"{path / 'config.json'}: num_patches {n} is not a square grid")
        data["image_size"] = side * data["patch_size"]
    data.update(ovis_fields, temporal_patch_size=1, preserve_original_pe=True, use_rope=True, num_patches=-1,
                model_type="siglip2_navit")
    try:
        return VisionConfig.from_dict(data), naflex
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None


def llm_config_from_hf(path: Path) -> Qwen3Config:
    """Ovis `llm_config` from a Qwen3ForCausalLM config.json (transformers 4 or 5 layout)."""
    raw = _read_config(path, "LLM")
    if raw.get("model_type") != "qwen3":
        raise ConfigError(f"{path / 'config.json'}: model_type {raw.get('model_type')!r} is not 'qwen3'")
    data = dict(raw)
    rope = data.pop("rope_parameters", None)  # transformers 5 groups rope_theta and scaling here
    if rope is not None:
        if "rope_theta" in rope:
            data.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            data.setdefault("rope_scaling", rope)
    if data.get("use_sliding_window"):
        raise ConfigError(f"{path / 'config.json'}: sliding-window attention is not supported")
    for k, v in _QWEN3_HF_DEFAULTS.items():
        data.setdefault(k, v)
    try:
        return Qwen3Config.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None


def _tensor_names(path: Path) -> list[str]:
    names = []
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


def _vision_state(path: Path, model: Ovis, naflex: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = _tensor_names(path)
    prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
    expected = {prefix + k.removeprefix(VISION_PREFIX): v.shape
                for k, v in model.state_dict().items() if k.startswith(VISION_PREFIX)}
    skip = {n for n in names
            if n.startswith((prefix + "head.", "text_model.")) or n in ("logit_scale", "logit_bias")}
    patch = prefix + "embeddings.patch_embedding.weight"
    d, c, p, _ = expected[patch]
    if naflex:
        expected[patch] = torch.Size((d, p * p * c))
    state = read_state_dict(path, expected, dtype, optional=skip)
    if naflex:  # NaFlex rows are (p_row, p_col, C); our pixel rows are (C, p_row, p_col)
        state[patch] = state[patch].view(d, p, p, c).permute(0, 3, 1, 2).contiguous()
    return {VISION_PREFIX + k.removeprefix(prefix): v for k, v in state.items()}


def _llm_state(path: Path, model: Ovis, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    expected = {k.removeprefix("llm."): v.shape for k, v in model.state_dict().items() if k.startswith("llm.")}
    optional = set()
    if model.config.llm_config.tie_word_embeddings:  # a tied checkpoint may or may not store lm_head
        expected.pop("lm_head.weight")
        optional = {"lm_head.weight"}
    state = read_state_dict(path, expected, dtype, optional=optional)
    return {"llm." + k: v for k, v in state.items()}


def build_from_parts(vision_dir: str | Path, llm_dir: str | Path, visual_vocab_size: int = 65536,
                     hidden_stride: int = 2, window_size: int = 112,
                     fullatt_block_indexes: str | list[int] | None = None, vet_init_std: float = 0.02,
                     dtype: torch.dtype = torch.float32) -> Ovis:
    """A new Ovis2.5 whose encoder and LLM come from HF checkpoints; head and VET freshly initialised.

    `fullatt_block_indexes` None means full attention in every encoder block (window_size unused then).
    Seed torch beforehand for a reproducible head/VET initialisation.
    """
    vision_dir, llm_dir = Path(vision_dir), Path(llm_dir)
    vit_config, naflex = vision_config_from_hf(vision_dir, hidden_stride=hidden_stride, window_size=window_size,
                                               fullatt_block_indexes=fullatt_block_indexes)
    config = OvisConfig(vit_config, llm_config_from_hf(llm_dir), visual_vocab_size)
    with torch.device("meta"):
        model = Ovis(config)
    state = _vision_state(vision_dir, model, naflex, dtype) | _llm_state(llm_dir, model, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.llm_config.tie_word_embeddings:
        model.llm.tie_weights()

    head, vte = model.visual_tokenizer.head, model.vte
    head.to_empty(device="cpu")
    vte.to_empty(device="cpu")
    for layer in head:  # Linear: torch's default (Kaiming-uniform); LayerNorm: ones / zeros
        layer.reset_parameters()
    nn.init.normal_(vte.weight, std=vet_init_std)
    head.to(dtype)
    vte.to(dtype)

    leftover = [n for n, t in model.state_dict().items() if t.is_meta]
    if leftover:  # every tensor is either copied or initialised above
        raise RuntimeError(f"build_from_parts left tensors uninitialised: {leftover[:5]}")
    return model.eval()
