"""Direct Preference Optimisation (DPO, sigmoid loss) for Ovis2.5: `phase = "dpo"`.

Data: datasets of a datainfo (data_format "conversation"), each sample a prompt -- official
`conversations` ending with a human turn (`<image>`/`<video>` placeholders, `image`/`video_frames`/`video`
relative to the dataset's image_dir) or a `question` string -- plus `chosen` and `rejected` response
strings (each may hold a `<think>...</think>` block). Each response is formatted as the final gpt turn by
the official formatter, so the label rules are the SFT ones (a response without a think block gets the
empty one, unsupervised), and only that final turn is supervised. `id` names a sample in logs and in the
reference cache (default: its index).

Step: pairs are packed first-fit into rows of `max_tokens` (`max_samples_per_pack` counts pairs); in a row
each pair is two segments, chosen then rejected, so both go through ONE packed forward. The prompt's images
are in both segments and are decoded once but encoded by the ViT twice (once per segment): encoding them
once would need the visual tokenizer called outside the wrapped model, which FSDP2 does not allow.
A response's log-prob is the sum of its token log-probs.

Loss per pair, with z = beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))):
    -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)  +  nll_weight * (-log pi(c) / |c|)
(eps = dpo_label_smoothing, the "conservative DPO" of noisy labels; the last term is a per-token NLL on
the chosen response). The step's loss is the mean over all pairs of the global step (any accumulation and
data-parallel layout gives the same value). The implicit rewards are beta * (log pi - log ref).
Beta: as beta -> 0, z -> 0, the loss -> log 2 and its gradient (proportional to beta) -> 0; as beta grows
(eps = 0) the loss approaches the hinge beta * max(0, -delta): pairs already ranked right stop
contributing, wrong ones get a constant-size push. The reference is the initial policy, either a frozen
copy (`dpo_ref = "model"`, sharded like the policy under FSDP) or log-probs computed by the policy before
the first step and cached in `ref_logps.safetensors`, keyed by sample (`dpo_ref = "cache"`: no second
model in memory, one extra no-grad pass over the data).

Metrics per step (metrics.jsonl): loss, reward_accuracy (share of pairs with chosen reward > rejected
reward; ties, as at the start, count as wrong), chosen_reward, rejected_reward, reward_margin,
chosen_logp, rejected_logp, nll, lr, grad_norm, pairs, pairs_per_s.
"""
from __future__ import annotations

import logging
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..constants import IGNORE_ID
from .config import TrainConfig, phase_options
from .data import DataError, DatasetSpec, PlannedSample, SampleBuilder, TrainSample, load_datainfo, plan_datasets, \
    prompt_turns
from .packing import pack_first_fit, target_segments
from .phases import frozen_copy
from .trainer import (PackedBins, all_reduce_sums, apply_update, close_run, compute_dtype, count_steps, forward_packed,
                      load_policy, log_step, make_optimizer, no_grad_sync, parallelize, pixel_budgets, plan_bins,
                      progress_bar, rank_bins, record_skips, resume_latest, save_if_due, setup_run)

log = logging.getLogger("ovis25.train")
REF_CACHE = "ref_logps.safetensors"


@dataclass
class DPOOptions:
    """The DPO recipe keys."""

    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0       # eps: probability that a preference label is flipped
    dpo_nll_weight: float = 0.0            # weight of the per-token NLL on the chosen response
    dpo_ref: str = "model"                 # model: frozen copy | cache: precomputed reference log-probs

    def validate(self) -> None:
        if not self.dpo_beta > 0:
            raise ValueError(f"recipe: dpo_beta must be > 0, got {self.dpo_beta}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise ValueError(f"recipe: dpo_label_smoothing must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.dpo_nll_weight < 0:
            raise ValueError(f"recipe: dpo_nll_weight must be >= 0, got {self.dpo_nll_weight}")
        if self.dpo_ref not in ("model", "cache"):
            raise ValueError(f"recipe: dpo_ref must be 'model' or 'cache', got {self.dpo_ref!r}")


# ---- loss ---------------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, nll_weight: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss (see the module docstring) from summed response log-probs (P,) each; returns
    (loss (P,), chosen reward (P,), rejected reward (P,)), the rewards detached."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if nll_weight:
        loss = loss + nll_weight * (-policy_chosen / chosen_tokens)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def pair_logps(model: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed forward over [chosen_0, rejected_0, chosen_1, ...] -> summed response log-probs of the
    chosen (P,) and rejected (P,) segments, and the chosen responses' token counts (P,)."""
    token_logps = forward_packed(model, batch, device, dtype).token_logps
    segment = target_segments(batch).to(device)
    n = len(batch["cu_seqlens"]) - 1
    sums = torch.zeros(n, dtype=token_logps.dtype, device=device).index_add(0, segment, token_logps)
    counts = torch.bincount(segment, minlength=n)
    return sums[0::2], sums[1::2], counts[0::2]


# ---- data ---------------------------------------------------------------------------------------------------
@dataclass
class PlannedPair:
    dataset: str
    index: int
    key: str                     # "<dataset>/<id or index>": names the pair in logs and the reference cache
    chosen: PlannedSample
    rejected: PlannedSample

    @property
    def length(self) -> int:
        return self.chosen.length + self.rejected.length


def supervise_final_turn(planned: PlannedSample) -> PlannedSample:
    """Labels on the last turn only: gpt turns inside the prompt are context, not the response."""
    last_ignored = max(i for i, label in enumerate(planned.labels) if label == IGNORE_ID)
    planned.labels[:last_ignored + 1] = array("i", [IGNORE_ID] * (last_ignored + 1))
    return planned


def pair_planner(builder: SampleBuilder, max_tokens: int):
    """plan(sample, spec, index) -> PlannedPair, for `plan_datasets`; raises DataError on a bad pair."""
    seen: set[str] = set()

    def plan(sample: dict, spec: DatasetSpec, index: int) -> PlannedPair:
        conv = prompt_turns(sample)
        key = f"{spec.name}/{sample.get('id', index)}"
        if key in seen:
            raise DataError("duplicate_id", f"id {sample.get('id')!r} is used by an earlier sample")
        sides = {}
        for side in ("chosen", "rejected"):
            value = sample.get(side)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"missing_{side}", f"no {side!r} response (need a non-empty string)")
            full = {**sample, "conversations": conv + [{"from": "gpt", "value": value}]}
            sides[side] = supervise_final_turn(builder.plan(full, spec, index))
        pair = PlannedPair(spec.name, index, key, sides["chosen"], sides["rejected"])
        if pair.length > max_tokens:
            raise DataError("too_long", f"chosen + rejected = {pair.length} tokens > max_tokens {max_tokens}")
        seen.add(key)
        return pair
    return plan


class PairBins(PackedBins):
    """Packed rows of pairs: each pair adds its chosen then its rejected segment."""

    def build(self, pair: PlannedPair) -> list[TrainSample]:
        chosen = self.builder.build(pair.chosen)
        rejected = TrainSample(*pair.rejected.token_tensors(),
                               chosen.pixel_values, chosen.grid_thws)  # the same prompt: reuse its pixels
        return [chosen, rejected]


def plan_pairs(cfg: TrainConfig, builder: SampleBuilder) -> list[PlannedPair]:
    specs = load_datainfo(cfg.datainfo, cfg.datasets or None, formats=("conversation",))
    return plan_datasets(specs, builder, cfg.seed, plan=pair_planner(builder, cfg.max_tokens))


# ---- reference log-probs ------------------------------------------------------------------------------------
def reference_cache(model: torch.nn.Module, pairs: list[PlannedPair], builder: SampleBuilder, cfg: TrainConfig,
                    path: Path, rank: int, world: int, device: torch.device, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """{pair key: [log ref(chosen), log ref(rejected)]}, read from `path` or computed with `model` (which must
    still hold the initial weights) in a no-grad pass split over the ranks, then written to `path`."""
    unique = list({p.key: p for p in pairs}.values())
    cache = load_file(str(path)) if path.exists() else {}
    (missing,) = all_reduce_sums([sum(p.key not in cache for p in unique)], device)  # every rank decides alike
    if not missing:
        return cache
    packs = [[unique[i] for i in pack]
             for pack in pack_first_fit([p.length for p in unique], cfg.max_tokens, cfg.max_samples_per_pack)]
    mine = packs[rank::world]
    mine += (mine[-1:] or packs[:1]) * (-(-len(packs) // world) - len(mine))  # as many forwards on every rank (FSDP)
    values: dict[str, torch.Tensor] = {}
    model.eval()
    dataset = PairBins(mine, builder)
    with torch.no_grad():
        for b in map(dataset.__getitem__, range(len(dataset))):
            if "input_ids" in b:  # pairs that fail to build are skipped (and counted) again while training
                chosen, rejected, _ = pair_logps(model, b, device, dtype)
                for pair, c, r in zip(b["built"], chosen.cpu(), rejected.cpu()):
                    values[pair.key] = torch.stack([c, r])
    model.train()
    if dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, values)
        values = {k: v for part in parts for k, v in part.items()}
    if rank == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(values, str(tmp))
        os.replace(tmp, path)  # a crash never leaves a partial cache behind
        log.info("reference log-probs of %d pairs cached in %s", len(values), path)
    return values


# ---- the loop -----------------------------------------------------------------------------------------------
def train_dpo(cfg: TrainConfig) -> Path:
    """Run DPO; returns the exported checkpoint directory (or the run directory without export)."""
    opts = phase_options(DPOOptions, cfg.extra)
    rank, world, device, out = setup_run(cfg)
    ckpt_root = out / "checkpoints"
    processor, model, lrs = load_policy(cfg)
    dtype = compute_dtype(cfg, device, world)
    builder = SampleBuilder(processor, pixel_budgets(cfg), cfg.max_tokens, cfg.on_bad_sample, cfg.num_frames)
    pairs = plan_pairs(cfg, builder)
    bins = plan_bins(pairs, cfg)
    total_steps = count_steps(len(bins), cfg, world)

    ref = frozen_copy(model) if opts.dpo_ref == "model" else None
    model = parallelize(model, cfg, world, device)
    if ref is not None:
        ref = parallelize(ref, cfg, world, device)
        cache = None
    else:  # before any resume: the policy must still hold the initial weights
        cache = reference_cache(model, pairs, builder, cfg, out / REF_CACHE, rank, world, device, dtype)
    optimizer, scheduler = make_optimizer(model, lrs, cfg, total_steps)
    start_step, skip_counts = resume_latest(model, optimizer, scheduler, ckpt_root, rank)

    dataset = PairBins(rank_bins(bins, cfg, rank, world, start_step, total_steps), builder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers)
    batches = iter(loader)
    metrics_file = out / "metrics.jsonl"
    progress = progress_bar(cfg, rank, total_steps, start_step)
    if rank == 0:
        log.info("dpo: %d pairs -> %d packed sequences; %d steps; reference: %s; %s", len(pairs), len(bins),
                 total_steps, opts.dpo_ref, builder.skips.summary())

    def reference(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is not None:
            both = torch.stack([cache[p.key] for p in b["built"]]).to(device)
            return both[:, 0], both[:, 1]
        with torch.no_grad():
            chosen, rejected, _ = pair_logps(ref, b, device, dtype)
        return chosen, rejected

    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        record_skips(micro, skip_counts)
        micro = [b for b in micro if "input_ids" in b]
        (global_pairs,) = all_reduce_sums([sum(len(b["built"]) for b in micro)], device)
        # sums over this rank's pairs: loss, accuracy, chosen/rejected reward, chosen/rejected logp, nll
        sums = torch.zeros(7, dtype=torch.float64)
        for j, b in enumerate(micro):
            with no_grad_sync(model, sync=j == len(micro) - 1):
                chosen, rejected, chosen_tokens = pair_logps(model, b, device, dtype)
                ref_chosen, ref_rejected = reference(b)
                loss, chosen_reward, rejected_reward = dpo_loss(
                    chosen, rejected, ref_chosen, ref_rejected, opts.dpo_beta, opts.dpo_label_smoothing,
                    chosen_tokens, opts.dpo_nll_weight)
                (loss.sum() * world / max(global_pairs, 1)).backward()
            sums += torch.stack([loss.sum(), (chosen_reward > rejected_reward).float().sum(), chosen_reward.sum(),
                                 rejected_reward.sum(), chosen.sum(), rejected.sum(),
                                 (-chosen / chosen_tokens).sum()]).detach().double().cpu()
        means = [v / max(global_pairs, 1) for v in all_reduce_sums(sums.tolist(), device)]
        grad_norm = apply_update(model, optimizer, scheduler, cfg, means[0], step)
        if grad_norm is None:
            continue

        names = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "nll")
        row = {"step": step + 1, **dict(zip(names, means))}
        row |= {"reward_margin": row["chosen_reward"] - row["rejected_reward"], "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "pairs": int(global_pairs),
                "pairs_per_s": global_pairs / (time.perf_counter() - t0)}
        if rank == 0:
            log_step(metrics_file, row, progress, dict(loss=f"{row['loss']:.4f}", acc=f"{row['reward_accuracy']:.2f}",
                                                       margin=f"{row['reward_margin']:.3f}", lr=f"{row['lr']:.2e}"))
        save_if_due(model, optimizer, scheduler, ckpt_root, step + 1, total_steps, skip_counts, cfg, rank, world)
    return close_run(model, processor, cfg, out, rank, builder, skip_counts, total_steps, progress)
