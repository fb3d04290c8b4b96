"""The training loop for P1-P3: plain PyTorch, one process or many under `torchrun`.

Parallelism, activation checkpointing and compilation are applied to the plain model in `parallelize`.
Every optimizer step consumes `grad_accum` packed sequences per rank; the loss is the sum of token
cross entropies divided by the number of supervised tokens of the whole global step, so it is exactly
the mean over all supervised tokens whatever the accumulation and data-parallel layout.

`phase="dpo"` and `phase="grpo"` run the preference / RL loops of `dpo.py` and `grpo.py`, which share the
run setup, parallelism, optimizer, checkpointing and export defined here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from ..checkpoint import TIED_KEY, exclusive_directory
from ..model import Ovis
from ..processing import PixelBudgets, Processor
from .config import TrainConfig
from .data import DataError, PlannedSample, SampleBuilder, load_datainfo, plan_datasets
from .packing import collate_packed, num_targets, pack_first_fit
from .lora import apply_lora, lora_parameters, merge_lora_state
from .precision import autocast, autocast_dtype, matmul_flops
from .phases import (PHASES, QKNormPhaseIn, freeze_all, param_groups, reinit_vet, select_trainable,
                     sharpen_visual_tokens)
from .state import (latest_checkpoint, load_training_state, prune_checkpoints, rng_state, save_training_state,
                    set_rng_state)
from .vision_cache import FrozenVisionCache

log = logging.getLogger("ovis25.train")


# ---- distributed ----------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Several sums over ranks in one collective."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def transformer_blocks(model: Ovis) -> list[torch.nn.Module]:
    return list(model.visual_tokenizer.vit.vision_model.encoder.layers) + list(model.llm.model.layers)


def parallel_mode(cfg: TrainConfig, world: int) -> str:
    if world == 1:
        return "none"
    return cfg.parallel if cfg.parallel != "auto" else "fsdp"


def parallelize(model: Ovis, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """Apply activation checkpointing, compilation and FSDP2/DDP to the plain model (torchtitan style).

    A model with nothing to train (a frozen DPO/GRPO reference) is sharded under FSDP but never wrapped
    by DDP, which has no gradients to synchronise for it."""
    for block in transformer_blocks(model):
        if cfg.activation_checkpointing:  # recompute each block in backward; module names stay unchanged
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if cfg.compile:
            block.compile(dynamic=True)
    model.to(device)
    mode = parallel_mode(cfg, world)
    vit = model.visual_tokenizer.vit
    # not under FSDP: a rank serving an image from memory would skip the all-gathers the others run
    if cfg.vision_cache_mb and mode != "fsdp" and not any(p.requires_grad for p in vit.parameters()):
        model.visual_tokenizer.feature_cache = FrozenVisionCache(cfg.vision_cache_mb * 2**20)
    if mode == "none" or (mode == "ddp" and not any(p.requires_grad for p in model.parameters())):
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.param_dtype), reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def forward_packed(model: torch.nn.Module, b: dict, device: torch.device, dtype: torch.dtype | None = None):
    """One packed row through the (possibly wrapped) model -> OvisOutput with the summed loss and per-target
    log-probs; `dtype`: autocast the products to it (None: float32)."""
    pixel_values = None if b["pixel_values"] is None else b["pixel_values"].to(device)
    with autocast(dtype, device):
        return model(b["input_ids"].to(device), pixel_values, b["grid_thws"], position_ids=b["position_ids"].to(device),
                     cu_seqlens=b["cu_seqlens"], targets=b["targets"].to(device), always_run_vision=True)


def no_grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ---- schedule -------------------------------------------------------------------------------------------
def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_ratio of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def qk_norm_blend(step: int, total: int, start: float, end: float) -> float:
    """0 before step start * total, rising linearly to 1 at step end * total, then 1."""
    first, last = round(start * total), round(end * total)
    if step >= last:
        return 1.0
    return 0.0 if step < first else (step - first) / (last - first)


# ---- data -----------------------------------------------------------------------------------------------
class PackedBins(torch.utils.data.Dataset):
    """Item i = the i-th packed sequence of this rank, built (pixels decoded) on demand in a worker."""

    def __init__(self, bins: list[list[PlannedSample]], builder: SampleBuilder):
        self.bins, self.builder = bins, builder

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict:
        samples, built, skipped = [], [], []
        for planned in self.bins[i]:
            try:
                samples += self.build(planned)
                built.append(planned)
            except DataError as e:
                if self.builder.on_error == "fail":
                    raise
                skipped.append((e.reason, f"{planned.dataset}[{planned.index}]: {e}"))
        batch = collate_packed(samples) if samples else {}
        batch["skipped"] = skipped
        batch["built"] = built
        batch["capacity"] = self.builder.max_length
        return batch

    def build(self, planned) -> list:
        """The packed segments of one planned item (DPO builds two: chosen and rejected)."""
        return [self.builder.build(planned)]


def plan_bins(planned: list, cfg: TrainConfig) -> list[list]:
    """Deterministic epochs: shuffle with (seed, epoch), then first-fit pack (items need a `length`)."""
    bins = []
    for epoch in range(cfg.epochs):
        order = list(range(len(planned)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        packs = pack_first_fit([planned[i].length for i in order], cfg.max_tokens, cfg.max_samples_per_pack)
        bins += [[planned[order[j]] for j in pack] for pack in packs]
    return bins


def count_steps(n_bins: int, cfg: TrainConfig, world: int) -> int:
    """Optimizer steps: all the packed sequences (or max_steps), `grad_accum` per rank per step."""
    per_step = cfg.grad_accum * world
    total_steps = n_bins // per_step if cfg.max_steps is None else cfg.max_steps
    if total_steps < 1 or total_steps * per_step > n_bins:
        raise ValueError(f"{n_bins} packed sequences cannot feed {total_steps} steps of {per_step} "
                         f"(grad_accum {cfg.grad_accum} x {world} ranks); add data, epochs or lower max_steps")
    return total_steps


def rank_bins(bins: list, cfg: TrainConfig, rank: int, world: int, start_step: int, total_steps: int) -> list:
    """This rank's packed sequences for steps start_step.. in order: step s uses global bins
    [s * grad_accum * world, ...), rank r the r-th slice of grad_accum of them."""
    per_step = cfg.grad_accum * world
    return [bins[s * per_step + rank * cfg.grad_accum + j] for s in range(start_step, total_steps)
            for j in range(cfg.grad_accum)]


def pixel_budgets(cfg: TrainConfig) -> PixelBudgets:
    lo, hi = PHASES.get(cfg.phase, PHASES["p3"])["pixels"]
    budgets = PixelBudgets.uniform(lo, hi)
    for name in vars(budgets):
        if getattr(cfg, name) is not None:
            setattr(budgets, name, getattr(cfg, name))
    return budgets


# ---- metrics --------------------------------------------------------------------------------------------
def training_flops(model: torch.nn.Module, tokens: int, patches: int) -> float:
    """~6 FLOPs per parameter per token it is applied to: LLM matmuls on every token, the ViT on every patch,
    the visual head on every 2x2 group; embedding tables (lookups) and the LM head (supervised positions
    only) are left out."""
    llm = vit = head = 0
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        if name.startswith("llm.model.layers."):
            llm += p.numel()
        elif name.startswith("visual_tokenizer.vit.vision_model.encoder."):
            vit += p.numel()
        elif name.startswith("visual_tokenizer.head."):
            head += p.numel()
    return 6.0 * (llm * tokens + vit * patches + head * patches / 4)


def plot_metrics(metrics_file: Path, out_png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: skipping %s", out_png)
        return False
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].plot([r["step"] for r in rows], [r["lr"] for r in rows])
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


# ---- pieces shared with the DPO and GRPO loops ------------------------------------------------------------
def setup_run(cfg: TrainConfig) -> tuple[int, int, torch.device, Path]:
    """Join the process group, create the run directory (config.json), seed; `train` has validated `cfg`."""
    rank, world, device = init_distributed()
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    return rank, world, device, out


def compute_dtype(cfg: TrainConfig, device: torch.device, world: int) -> torch.dtype | None:
    """The recipe's `autocast` resolved on this machine (None: float32), the same on every rank: bfloat16 only
    where all ranks chose it."""
    dtype = autocast_dtype(cfg.autocast, device)
    if world > 1 and all_reduce_sum(float(dtype is None), device) > 0:
        dtype = None
    log.info("%s: products run in %s", cfg.phase, "float32" if dtype is None else str(dtype).removeprefix("torch."))
    return dtype


def load_policy(cfg: TrainConfig) -> tuple[Processor, Ovis, dict[str, float]]:
    """The processor and the model to train, its trainable parameters selected -> {name: learning rate}."""
    processor = Processor.from_pretrained(cfg.init)
    model = Ovis.from_pretrained(cfg.init, dtype=torch.float32)
    model.train()
    if cfg.reinit_vet if cfg.reinit_vet is not None else cfg.phase == "p1":
        reinit_vet(model, cfg.vet_init_mean, cfg.vet_init_std, cfg.seed)
    if cfg.sharpen_visual_tokens != 1.0:
        sharpen_visual_tokens(model, cfg.sharpen_visual_tokens)
    if cfg.lora_rank:  # adapters only, plus whatever train_modules names explicitly (e.g. the head and VET)
        apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed)
        lrs = select_trainable(model, cfg.train_modules, cfg.lr) if cfg.train_modules else freeze_all(model)
        for name, p in lora_parameters(model).items():
            p.requires_grad_(True)
            lrs[name] = cfg.lr
    else:
        lrs = select_trainable(model, cfg.train_modules or PHASES.get(cfg.phase, PHASES["p3"])["train_modules"],
                               cfg.lr)
    return processor, model, lrs


def make_optimizer(model: torch.nn.Module, lrs: dict[str, float], cfg: TrainConfig, total_steps: int):
    """AdamW over the selected parameters with linear warmup + cosine decay over `total_steps`."""
    inner = getattr(model, "module", model)  # DDP wraps; FSDP2 keeps the module (and its parameter names)
    optimizer = torch.optim.AdamW(param_groups(inner, lrs, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, total=total_steps, warmup=warmup, min_ratio=cfg.min_lr_ratio))
    return optimizer, scheduler


def resume_latest(model, optimizer, scheduler, ckpt_root: Path, rank: int) -> tuple[int, dict]:
    """(first step to run, skip counts so far): from the newest valid checkpoint, else (0, {})."""
    resume = latest_checkpoint(ckpt_root)
    if resume is None:
        return 0, {}
    start_step, skip_counts = restore(model, optimizer, scheduler, resume, rank)
    if rank == 0:
        log.info("resumed from %s (step %d)", resume, start_step)
    return start_step, skip_counts


def progress_bar(cfg: TrainConfig, rank: int, total: int, initial: int):
    if rank != 0 or not cfg.progress:
        return None
    import sys

    from tqdm import tqdm
    # redraw often on a terminal; in a log file, a line every 10 s is plenty
    return tqdm(total=total, initial=initial, desc=f"{cfg.phase} {Path(cfg.out_dir).name}", unit="step",
                dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)


def record_skips(batches: list[dict], counts: dict) -> None:
    """Count and log the samples a DataLoader item had to drop."""
    for b in batches:
        for reason, where in b["skipped"]:
            counts[reason] = counts.get(reason, 0) + 1
            log.warning("skipping %s", where)


def apply_update(model, optimizer, scheduler, cfg: TrainConfig, loss: float, step: int) -> float | None:
    """Clip and step, given the accumulated gradients and the step's loss; returns the gradient norm, or None
    when a non-finite loss skipped the update (on_nan=skip; on_nan=stop raises)."""
    if not math.isfinite(loss):
        if cfg.on_nan == "stop":
            raise FloatingPointError(f"step {step}: loss is {loss}; stopping (on_nan=stop)")
        log.warning("step %d: loss is %s; skipping the update (on_nan=skip)", step, loss)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return None
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def log_step(metrics_file: Path, row: dict, progress, postfix: dict[str, str]) -> None:
    """Rank 0: append the step's metrics to metrics.jsonl and update the progress bar."""
    with open(metrics_file, "a") as f:
        f.write(json.dumps(row) + "\n")
    if progress is not None:
        progress.update(1)
        progress.set_postfix(**postfix)


def finish_run(model, processor: Processor, cfg: TrainConfig, out: Path, rank: int, summary: dict) -> Path:
    """Export (when asked), plot the metrics and write summary.json; returns the export or the run dir."""
    result = out
    if cfg.export:
        result = export(model, processor, cfg, out / "final", rank, cfg.merge_with_init)
    if rank == 0:
        metrics_file = out / "metrics.jsonl"
        if metrics_file.exists():
            plot_metrics(metrics_file, out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return result


# ---- the loop -------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Run one phase; returns the exported checkpoint directory (or the run directory without export).
    The run directory is held for the whole run (by rank 0 under torchrun): a second run on it stops at once."""
    cfg.validate()  # before the run directory is created
    lead = int(os.environ.get("RANK", "0")) == 0
    with exclusive_directory(cfg.out_dir, "training run") if lead else contextlib.nullcontext():
        if cfg.phase == "dpo":
            from .dpo import train_dpo
            return train_dpo(cfg)
        if cfg.phase == "grpo":
            from .grpo import train_grpo
            return train_grpo(cfg)
        return train_supervised(cfg)


def train_supervised(cfg: TrainConfig) -> Path:
    """P0-P3: next-token loss on the assistant turns of packed samples."""
    rank, world, device, out = setup_run(cfg)
    ckpt_root = out / "checkpoints"
    processor, model, lrs = load_policy(cfg)
    dtype = compute_dtype(cfg, device, world)

    builder = SampleBuilder(processor, pixel_budgets(cfg), cfg.max_tokens, cfg.on_bad_sample, cfg.num_frames)
    planned = plan_datasets(load_datainfo(cfg.datainfo, cfg.datasets or None), builder, cfg.seed)
    bins = plan_bins(planned, cfg)
    total_steps = count_steps(len(bins), cfg, world)

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = parallelize(model, cfg, world, device)
    optimizer, scheduler = make_optimizer(model, lrs, cfg, total_steps)
    start_step, skip_counts = resume_latest(model, optimizer, scheduler, ckpt_root, rank)

    dataset = PackedBins(rank_bins(bins, cfg, rank, world, start_step, total_steps), builder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers)
    batches = iter(loader)

    peak = matmul_flops(dtype or torch.float32, device) * world
    metrics_file = out / "metrics.jsonl"
    progress = progress_bar(cfg, rank, total_steps, start_step)
    if rank == 0:
        log.info("%s: %d samples -> %d packed sequences; %d steps; %.1fM params (%.1fM trainable); %s",
                 cfg.phase, len(planned), len(bins), total_steps, n_params / 1e6, n_trainable / 1e6,
                 builder.skips.summary())
    phase_in = QKNormPhaseIn(model) if cfg.qk_norm_phase_in is not None else None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        if phase_in is not None:
            phase_in.blend = qk_norm_blend(step, total_steps, *cfg.qk_norm_phase_in)
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        record_skips(micro, skip_counts)
        micro = [b for b in micro if "input_ids" in b]
        local_targets = sum(num_targets(b) for b in micro)
        global_targets = all_reduce_sum(local_targets, device)
        loss_sum, tokens, patches = 0.0, 0, 0
        for j, b in enumerate(micro):
            with no_grad_sync(model, sync=j == len(micro) - 1):
                out_ = forward_packed(model, b, device, dtype)
                (out_.loss * world / max(global_targets, 1)).backward()
            loss_sum += out_.loss.item()
            tokens += b["input_ids"].shape[1]
            patches += 0 if b["pixel_values"] is None else b["pixel_values"].shape[0]
        loss = all_reduce_sum(loss_sum, device) / max(global_targets, 1)
        grad_norm = apply_update(model, optimizer, scheduler, cfg, loss, step)
        if grad_norm is None:
            continue

        dt = time.perf_counter() - t0
        tokens_all, patches_all = all_reduce_sum(tokens, device), all_reduce_sum(patches, device)
        capacity = len(micro) * cfg.max_tokens * world
        row = {"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens_per_s": tokens_all / dt, "padding_ratio": 1 - tokens_all / max(capacity, 1),
               "mfu": training_flops(model, tokens_all, patches_all) / dt / peak, "supervised_tokens": int(global_targets)}
        if rank == 0:
            log_step(metrics_file, row, progress, dict(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}",
                                                       tok_s=f"{row['tokens_per_s']:.0f}",
                                                       pad=f"{row['padding_ratio']:.2f}", mfu=f"{row['mfu']:.1%}"))
        save_if_due(model, optimizer, scheduler, ckpt_root, step + 1, total_steps, skip_counts, cfg, rank, world)
    if phase_in is not None:  # export Qwen3 as it is saved
        phase_in.remove()
    return close_run(model, processor, cfg, out, rank, builder, skip_counts, total_steps, progress)


def save_if_due(model, optimizer, scheduler, ckpt_root: Path, done: int, total_steps: int, skip_counts: dict,
                cfg: TrainConfig, rank: int, world: int) -> None:
    """A resumable checkpoint every `save_every` steps (the end of the run is covered by the export)."""
    if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
        save(model, optimizer, scheduler, ckpt_root / f"step-{done:08d}", done, skip_counts, cfg, rank, world)


def close_run(model, processor, cfg: TrainConfig, out: Path, rank: int, builder, skip_counts: dict, total_steps: int,
              progress) -> Path:
    if progress is not None:
        progress.close()
    if rank == 0:
        log.info("done: %s; skipped while training: %s", builder.skips.summary(), skip_counts or "none")
        cache = getattr(model, "module", model).visual_tokenizer.feature_cache
        if cache is not None:
            log.info("%s", cache.summary())
    summary = {"steps": total_steps, "skipped": skip_counts, "plan_skips": dict(builder.skips.counts)}
    return finish_run(model, processor, cfg, out, rank, summary)


def _full_state(model: torch.nn.Module, optimizer=None):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def save(model, optimizer, scheduler, ckpt_dir: Path, step: int, skip_counts: dict, cfg: TrainConfig, rank: int,
         world: int) -> None:
    msd, osd = _full_state(model, optimizer)
    if getattr(model, "module", model).config.llm_config.tie_word_embeddings:
        msd.pop(TIED_KEY, None)  # one storage for the shared matrix; restore() re-ties it
    rngs = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if rank == 0:
        trainer = {"step": step, "scheduler": scheduler.state_dict(), "skipped": skip_counts}
        trainer["scheduler"].pop("lr_lambdas", None)
        save_training_state(ckpt_dir, msd, osd, trainer, rngs)
        prune_checkpoints(ckpt_dir.parent, cfg.keep_last)
    if dist.is_initialized():
        dist.barrier()


def restore(model, optimizer, scheduler, ckpt_dir: Path, rank: int) -> tuple[int, dict]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    msd, osd, trainer, rng = load_training_state(ckpt_dir, rank)
    if TIED_KEY not in msd:
        msd[TIED_KEY] = msd["llm.model.embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    # a trainable parameter that never received a gradient (e.g. the ViT under text-only data) has no state
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict({**scheduler.state_dict(), **trainer["scheduler"]})
    set_rng_state(rng)
    return trainer["step"], trainer.get("skipped", {})


def export(model, processor: Processor, cfg: TrainConfig, target: Path, rank: int,
           merge_with_init: float = 0.0) -> Path:
    """The trained weights (that share of them replaced by `cfg.init`'s, see `TrainConfig.merge_with_init`) in
    the official checkpoint format, with the tokenizer and configs."""
    msd, _ = _full_state(model)
    if cfg.lora_rank:
        msd = merge_lora_state(msd, cfg.lora_alpha / cfg.lora_rank)
    if rank == 0:
        if merge_with_init:
            start = Ovis.from_pretrained(cfg.init).state_dict()
            msd = {k: v.lerp(start[k].to(v.dtype), merge_with_init) for k, v in msd.items()}
        with torch.device("meta"):
            plain = Ovis(getattr(model, "module", model).config)
        plain.load_state_dict(msd, assign=True)
        if plain.config.llm_config.tie_word_embeddings:
            plain.llm.tie_weights()
        gen = Path(cfg.init) / "generation_config.json"
        plain.save_pretrained(target, processor=processor,
                              generation_config=json.loads(gen.read_text()) if gen.exists() else None)
        for extra in ("chat_template.json",):
            if (Path(cfg.init) / extra).exists() and not (target / extra).exists():
                shutil.copy(Path(cfg.init) / extra, target / extra)
    if dist.is_initialized():
        dist.barrier()
    return target
