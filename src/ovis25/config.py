"""Configuration dataclasses, read from and written to the official Ovis2.5 `config.json`.

The on-disk layout is the released one: top-level `model_type: "ovis2_5"` with nested `vit_config`
(model_type `siglip2_navit`) and `llm_config` (model_type `qwen3`). Fields we do not model are kept in
`extra` and written back unchanged, so a load/save round trip never loses information.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config.json that cannot describe an Ovis2.5 model."""


class ConfigSection:
    """A nested config.json object (`vit_config`, `llm_config`): known fields become dataclass fields,
    the rest is kept in `extra` and written back unchanged."""

    section: ClassVar[str]
    required: ClassVar[tuple[str, ...]]

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.section}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        missing = [n for n in cls.required if n not in data]
        if missing:
            raise ConfigError(f"{cls.section}: missing required field(s) {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        out = copy.deepcopy(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out


@dataclass
class VisionConfig(ConfigSection):
    """SigLIP2 NaViT encoder (`vit_config`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 512
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_stride: int = 2
    window_size: int = 112
    fullatt_block_indexes: str | list[int] | None = None
    temporal_patch_size: int = 1
    preserve_original_pe: bool = True
    use_rope: bool = True
    num_patches: int = -1
    model_type: str = "siglip2_navit"
    extra: dict[str, Any] = field(default_factory=dict)

    section: ClassVar[str] = "vit_config"
    required: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
    )

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vit_config: hidden_size {self.hidden_size} not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"vit_config: unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def full_attention_blocks(self) -> set[int]:
        """Blocks with full (per-frame) attention; all of them when `fullatt_block_indexes` is null."""
        idx = self.fullatt_block_indexes
        if idx is None:
            return set(range(self.num_hidden_layers))
        if isinstance(idx, str):
            idx = [int(s) for s in idx.replace(" ", "").split(",") if s]
        return set(idx)

    @property
    def window_groups(self) -> int:
        """Side of an attention window, in hidden_stride x hidden_stride groups of patches."""
        return self.window_size // self.hidden_stride // self.patch_size



@dataclass
class Qwen3Config(ConfigSection):
    """Qwen3 decoder (`llm_config`)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "qwen3"
    extra: dict[str, Any] = field(default_factory=dict)

    section: ClassVar[str] = "llm_config"
    required: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads",
    )

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"llm_config: num_attention_heads {self.num_attention_heads} not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"llm_config: unsupported hidden_act {self.hidden_act!r}")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) \
                not in (None, "default"):
            raise ConfigError(f"llm_config: rope_scaling {self.rope_scaling} is not supported")



@dataclass
class OvisConfig:
    """The whole model: vision encoder + visual tokenizer head + VET + Qwen3."""

    vit_config: VisionConfig = field(default_factory=VisionConfig)
    llm_config: Qwen3Config = field(default_factory=Qwen3Config)
    visual_vocab_size: int = 65536
    model_type: str = "ovis2_5"
    extra: dict[str, Any] = field(default_factory=dict)

    required: ClassVar[tuple[str, ...]] = ("vit_config", "llm_config", "visual_vocab_size")
    NUM_INDICATORS: ClassVar[int] = 4  # image start/end, video start/end: the last 4 VET rows

    def __post_init__(self) -> None:
        if self.visual_vocab_size <= self.NUM_INDICATORS:
            raise ConfigError(f"visual_vocab_size must exceed {self.NUM_INDICATORS}, got {self.visual_vocab_size}")

    @classmethod
    def from_dict(cls, data: dict) -> "OvisConfig":
        if not isinstance(data, dict):
            raise ConfigError("config.json: expected a JSON object")
        missing = [n for n in cls.required if n not in data]
        if missing:
            raise ConfigError(f"config.json: missing required field(s) {', '.join(missing)}")
        if data.get("model_type", "ovis2_5") not in ("ovis2_5", "ovis"):
            raise ConfigError(f"config.json: model_type {data['model_type']!r} is not an Ovis2.5 model")
        rest = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("vit_config", "llm_config",
                                                                           "visual_vocab_size", "model_type")}
        return cls(VisionConfig.from_dict(data["vit_config"]), Qwen3Config.from_dict(data["llm_config"]),
                   data["visual_vocab_size"], data.get("model_type", "ovis2_5"), rest)

    def to_dict(self) -> dict:
        out = copy.deepcopy(self.extra)
        out.update(model_type=self.model_type, visual_vocab_size=self.visual_vocab_size,
                   vit_config=self.vit_config.to_dict(), llm_config=self.llm_config.to_dict())
        # Top-level mirrors of the LLM, as in the released config.json.
        out.setdefault("architectures", ["Ovis2_5"])
        out.setdefault("conversation_formatter_class", "Qwen3ConversationFormatter")
        out.update(hidden_size=self.llm_config.hidden_size, vocab_size=self.llm_config.vocab_size,
                   num_attention_heads=self.llm_config.num_attention_heads,
                   max_position_embeddings=self.llm_config.max_position_embeddings)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "OvisConfig":
        path = Path(path)
        return cls.from_dict(read_config_json(path / "config.json" if path.is_dir() else path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def read_config_json(file: Path) -> dict:
    """A config.json as a dict, with a ConfigError naming the file when it is missing or not an object."""
    if not file.exists():
        raise ConfigError(f"no config.json at {file}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return data


def ovis2_5_2b() -> OvisConfig:
    """Released Ovis2.5-2B shapes: SigLIP2-so400m (patch 16, 512 px) + Qwen3-1.7B, tied embeddings."""
    return OvisConfig(VisionConfig(), Qwen3Config(), 65536)


def ovis2_5_9b() -> OvisConfig:
    """Released Ovis2.5-9B shapes: SigLIP2-so400m + Qwen3-8B, untied LM head."""
    llm = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    return OvisConfig(VisionConfig(), llm, 65536)
