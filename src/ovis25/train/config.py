"""Training configuration: one dataclass, read from a TOML recipe, overridable with `key=value`.

Recipes may group keys in tables ([model], [data], [optim], [run]); the tables are flattened, so every
key is unique and `lr=3e-4` on the command line overrides it wherever it was written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class TrainConfig:
    # model and run
    init: str = ""                         # checkpoint directory to start from (official layout)
    out_dir: str = "runs/exp"
    phase: str = "p3"                      # p1 | p2 | p3 | dpo | grpo
    # data
    datainfo: str = ""
    datasets: list[str] = field(default_factory=list)   # names from the datainfo, optionally `name:ratio`
    max_tokens: int = 4096                 # packed sequence length, also the per-sample limit
    max_samples_per_pack: int | None = None
    on_bad_sample: str = "skip"            # skip (count and log) | fail
    num_workers: int = 0
    num_frames: int = 8
    single_image_min_pixels: int | None = None   # None: the phase preset
    single_image_max_pixels: int | None = None
    multiple_image_min_pixels: int | None = None
    multiple_image_max_pixels: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    # optimisation
    train_modules: str | None = None       # official syntax `llm:2e-5|visual_tokenizer|vte`; None: phase preset
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1                    # packed sequences per rank per optimizer step
    seed: int = 0
    reinit_vet: bool | None = None         # None: True for p1
    vet_init_mean: float = 0.0
    vet_init_std: float = 0.02
    # multiply the visual head's LayerNorm (so every visual token logit) by this at the start: a softmax
    # temperature of 1/x, sharper visual tokens; a plain change of weights, saved in the official format
    sharpen_visual_tokens: float = 1.0
    # phase the LLM's QK-norm in over the run, [a, b] as fractions of it: queries and keys keep their lengths
    # (gains only) until a, then blend linearly into Qwen3's normalisation, complete from b on; the exported model
    # is the official architecture. A small Qwen3 from scratch learns key-value recall this way (recall.py)
    qk_norm_phase_in: list[float] | None = None
    on_nan: str = "skip"                   # skip the step | stop the run
    # LoRA (0 = off): adapters on the Linear layers under `lora_targets`; base weights stay frozen
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "llm"
    # system
    parallel: str = "auto"                 # auto | none | ddp | fsdp
    param_dtype: str = "float32"           # FSDP2 mixed precision: bfloat16 params, float32 reduce
    # the dtype products run in: auto (bfloat16 on GPUs and on CPUs where it is much faster, else float32) |
    # bfloat16 | off; weights, optimizer state and checkpoints stay float32 (train/precision.py)
    autocast: str = "auto"
    activation_checkpointing: bool = False
    # MiB of a frozen ViT's outputs kept in memory, one entry per image, so that images seen again (later
    # epochs, DPO pairs, GRPO groups) skip the ViT; 0: off. Never used under FSDP or while the ViT trains
    vision_cache_mb: int = 2048
    compile: bool = False
    save_every: int = 0                    # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    log_every: int = 1
    export: bool = True                    # write `final/` in the official checkpoint format
    # share of the initial weights in the exported ones (weight-space ensembling, as in WiSE-FT): 0 exports the
    # trained weights, 0.5 the midpoint between them and `init`; checkpoints for resuming keep the trained ones
    merge_with_init: float = 0.0
    progress: bool = True
    # DPO / GRPO keys live in their own modules' configs but share this file's recipe
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.init:
            raise ValueError("recipe: `init` (the checkpoint directory to start from) is required")
        if self.extra and self.phase not in ("dpo", "grpo"):  # only those phases read keys of their own
            raise ValueError(f"recipe: unknown key(s) {sorted(self.extra)} for phase {self.phase!r}")
        for name, allowed in (("on_bad_sample", ("skip", "fail")), ("on_nan", ("skip", "stop")),
                              ("parallel", ("auto", "none", "ddp", "fsdp")),
                              ("param_dtype", ("float32", "bfloat16")),
                              ("autocast", ("auto", "bfloat16", "off"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"recipe: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_tokens", "grad_accum", "epochs", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe: {name} must be >= 1, got {getattr(self, name)}")
        if self.vision_cache_mb < 0:
            raise ValueError(f"recipe: vision_cache_mb must be >= 0 (0: off), got {self.vision_cache_mb}")
        if not 0 <= self.merge_with_init < 1:
            raise ValueError(f"recipe: merge_with_init must be in [0, 1), got {self.merge_with_init}")
        if self.qk_norm_phase_in is not None:
            phase_in = self.qk_norm_phase_in
            if not (isinstance(phase_in, list) and len(phase_in) == 2
                    and all(isinstance(x, (int, float)) for x in phase_in) and 0 <= phase_in[0] <= phase_in[1] <= 1):
                raise ValueError("recipe: qk_norm_phase_in must be [a, b] with 0 <= a <= b <= 1 (fractions of the "
                                 f"run), got {phase_in!r}")
            if self.phase in ("dpo", "grpo") or self.compile:
                raise ValueError("recipe: qk_norm_phase_in works outside dpo/grpo and without compile (a compiled "
                                 f"model would recompile every step); got phase {self.phase!r}, "
                                 f"compile={self.compile}")
        if not self.sharpen_visual_tokens > 0:
            raise ValueError(f"recipe: sharpen_visual_tokens must be > 0, got {self.sharpen_visual_tokens}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("recipe: need lr > 0, 0 <= min_lr_ratio <= 1, 0 <= warmup_ratio < 1")


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """TOML recipe (tables flattened) + `key=value` overrides; unknown keys go to `extra`."""
    flat: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"recipe {path}: {e}") from None
        for key, value in data.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    if k in flat:
                        raise ValueError(f"recipe {path}: key {k!r} appears in two tables")
                    flat[k] = v
            else:
                flat[key] = value
        base = path.parent
        for key in ("init", "datainfo"):  # paths in a recipe are relative to the recipe file
            if isinstance(flat.get(key), str) and flat[key] and not Path(flat[key]).is_absolute() \
                    and (base / flat[key]).exists():
                flat[key] = str(base / flat[key])
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} is not key=value")
        flat[key.strip()] = _parse_value(value.strip())
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    known = {k: v for k, v in flat.items() if k in names}
    cfg = TrainConfig(**known, extra={k: v for k, v in flat.items() if k not in names})
    return cfg


def phase_options(cls, extra: dict):
    """The DPO/GRPO keys of a recipe (collected in `TrainConfig.extra`) as the phase's option dataclass;
    a key the phase does not know is an error (a typo would otherwise be ignored silently)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown}; this phase knows {names} besides the common keys")
    options = cls(**extra)
    options.validate()
    return options
