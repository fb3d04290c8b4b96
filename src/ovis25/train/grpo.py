"""Group Relative Policy Optimisation (GRPO) for Ovis2.5: `phase = "grpo"`.

Data: datasets of a datainfo (data_format "conversation"); each sample a prompt -- official `conversations`
ending with a human turn, or a `question` string -- with its `image`/`video_frames`/`video`, a reference
`answer` (string or number) and optionally `reward` (a reward spec or a list of them, see rewards.py;
default: the recipe's `rewards`).

One GRPO step (`max_steps` counts these) is one rollout batch:
  1. Rollout: the ranks split `grpo_prompts_per_step` prompts; each samples `grpo_group_size` (G) responses
     per prompt with the built-in `Engine` (all prompts prefilled together, KV-cache decode, thinking on/off,
     thinking budget) on the current policy weights: the policy module itself without FSDP; under FSDP the
     full weights are gathered into a plain copy on every rank first. Sampling seeds derive from (seed,
     step, prompt, g), so a resumed run samples what the uninterrupted one did. Thinking is on for every
     prompt with `grpo_thinking`, or for a fixed share of the prompts with `grpo_thinking_share` (training
     on answer-only rollouts erodes thinking mode).
  2. Rewards: the weighted reward functions of each prompt; advantages per group
     A = (r - mean_group) / (std_group + 1e-4), with the population std, so a group of identical rewards
     (or of one response) gets A = 0.
  3. Old log-probs (the policy right after the rollout) and, with `grpo_kl_coef` > 0, the reference
     log-probs (a frozen copy of the initial policy) of every response token, computed once.
  4. `grpo_epochs` optimizer steps over the batch, each minimising the mean over the response tokens t of the
     global batch (`grpo_loss_norm = "token"`: their sum divided by their number; "sequence": each response's
     mean over its tokens, averaged over the responses, as in the GRPO paper) of
         -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + kl_coef * k3_t,    rho_t = exp(logp_t - old_t),
         k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
     (k3: the non-negative, unbiased per-token estimator of KL(policy || reference); eps = grpo_clip_eps).
Responses are trained on the exact sampled token ids. Ids the engine forced (the thinking-budget
early-stop text) stay in the context but are not optimised: the policy did not sample them. The old
log-probs come from the training forward, i.e. the untempered policy, whatever `grpo_temperature`.
`grad_accum` is not used: each rank packs its responses into rows of `max_tokens` and accumulates over all.
Distributed: rows without images still run the visual tokenizer on a blank image (times 0), so DDP sees
a gradient for every parameter and FSDP ranks run the same collectives whatever their data.

Metrics per step (metrics.jsonl): loss, reward_mean, reward_std, reward_<name> (unweighted means),
reward_errors, zero_advantage_groups (share of groups with A = 0), responses, trained_responses (those with
A != 0, or all of them with a KL term: the others add nothing to the gradient and are left out of the
forwards), response_tokens, thinking_tokens,
kl, clip_fraction (share of tokens whose ratio is clipped), lr, grad_norm, rollout_s, step_s; the rank-0
responses of each step go to rollouts.jsonl.

`rollout_backend = "openai"` samples from an OpenAI-compatible server at `rollout_url` instead (e.g.
`ovis25 serve`, vLLM). Weight sync: before every rollout the policy is exported in the official format to
`<out_dir>/rollout_weights`, then rank 0 calls the `rollout_reload` hook, "module:function", as
`function(path: str)`; it must make the server serve those weights before returning (restart it, or call
its reload endpoint). Without a hook the server keeps its weights and the rollouts are off-policy. The
responses are re-tokenized locally (thinking rebuilt from `reasoning_content`); images go as data URLs.
"""
from __future__ import annotations

import base64
import importlib
import json
import logging
import mimetypes
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import TIED_KEY
from ..constants import IGNORE_ID
from ..generation import EARLY_STOP_TEXT, Engine, GenerationConfig
from ..model import Ovis
from ..processing.chat import EMPTY_THINK, IMAGE_TOKEN
from .config import TrainConfig, phase_options
from .data import DataError, DatasetSpec, PlannedSample, SampleBuilder, TrainSample, load_datainfo, plan_datasets, \
    prompt_turns
from .lora import merge_lora_state
from .packing import collate_packed, pack_first_fit, target_segments
from .phases import freeze_all, frozen_copy
from .rewards import RewardScorer, parse_rewards
from .trainer import (all_reduce_sums, apply_update, close_run, compute_dtype, export, forward_packed, load_policy,
                      log_step, make_optimizer, no_grad_sync, parallel_mode, parallelize, pixel_budgets, progress_bar,
                      resume_latest, save_if_due, setup_run)

log = logging.getLogger("ovis25.train")
ADV_EPS = 1e-4


@dataclass
class GRPOOptions:
    """The GRPO recipe keys."""

    rewards: list[str] = field(default_factory=lambda: ["exact:1.0"])  # default reward specs
    grpo_group_size: int = 4               # G responses per prompt
    grpo_prompts_per_step: int = 8         # prompts per step over all ranks (a multiple of the rank count)
    grpo_epochs: int = 1                   # optimizer steps per rollout batch
    grpo_clip_eps: float = 0.2
    grpo_kl_coef: float = 0.0              # 0: no KL penalty and no reference model
    grpo_max_new_tokens: int = 256
    grpo_temperature: float = 1.0
    grpo_top_p: float = 1.0
    grpo_thinking: bool = False
    grpo_thinking_share: float = 0.0       # without grpo_thinking: the share of prompts rolled out with thinking
                                           # on (drawn per prompt, fixed for the run), so RL keeps both modes
    grpo_thinking_budget: int = 0          # with thinking: force the answer after this many tokens (0: off)
    grpo_loss_norm: str = "token"          # token: every response token weighs the same; sequence: every response
    grpo_rollout_batch: int = 64           # engine slots: sequences decoded together
    rollout_backend: str = "engine"        # engine | openai
    rollout_url: str = ""                  # the OpenAI-compatible endpoint, e.g. http://host:8000/v1
    rollout_model: str = "default"         # model name sent to the endpoint
    rollout_reload: str = ""               # "module:function" called with the synced weights directory

    def validate(self) -> None:
        parse_rewards(self.rewards)
        for name in ("grpo_group_size", "grpo_prompts_per_step", "grpo_epochs", "grpo_max_new_tokens",
                     "grpo_rollout_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.grpo_clip_eps < 1 or self.grpo_kl_coef < 0 or self.grpo_thinking_budget < 0:
            raise ValueError("recipe: need 0 < grpo_clip_eps < 1, grpo_kl_coef >= 0, grpo_thinking_budget >= 0")
        if not 0 <= self.grpo_thinking_share <= 1:
            raise ValueError(f"recipe: grpo_thinking_share must be in [0, 1], got {self.grpo_thinking_share}")
        if not self.grpo_temperature > 0 or not 0 < self.grpo_top_p <= 1:
            raise ValueError("recipe: need grpo_temperature > 0 (sampling) and 0 < grpo_top_p <= 1")
        if self.grpo_loss_norm not in ("token", "sequence"):
            raise ValueError(f"recipe: grpo_loss_norm must be 'token' or 'sequence', got {self.grpo_loss_norm!r}")
        if self.rollout_backend not in ("engine", "openai"):
            raise ValueError(f"recipe: rollout_backend must be 'engine' or 'openai', got {self.rollout_backend!r}")
        if self.rollout_backend == "openai" and not self.rollout_url:
            raise ValueError("recipe: rollout_backend = 'openai' needs rollout_url")
        if self.rollout_reload and ":" not in self.rollout_reload:
            raise ValueError(f"recipe: rollout_reload must be 'module:function', got {self.rollout_reload!r}")

    def thinks(self, key: str) -> bool:
        """Whether the prompt named `key` is rolled out with thinking on."""
        return self.grpo_thinking or (self.grpo_thinking_share > 0
                                      and random.Random(key).random() < self.grpo_thinking_share)

    def generation_config(self) -> GenerationConfig:
        """The rollout settings; `enable_thinking` is that of the thinking prompts, if any (others override it)."""
        return GenerationConfig(max_new_tokens=self.grpo_max_new_tokens, do_sample=True,
                                temperature=self.grpo_temperature, top_p=self.grpo_top_p,
                                enable_thinking=self.grpo_thinking or self.grpo_thinking_share > 0,
                                thinking_budget=self.grpo_thinking_budget or None)


# ---- the objective ------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages (r - mean) / (std + eps) per group (row), population std.
    A group of identical rewards gets exactly 0 (float rounding of its mean could leave ~1e-17 / eps)."""
    mean = rewards.mean(-1, keepdim=True)
    std = (rewards - mean).pow(2).mean(-1, keepdim=True).sqrt()
    same = (rewards == rewards[..., :1]).all(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                    ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token loss -min(rho A, clip(rho) A) + kl_coef * k3 (see the module docstring), all (N,).
    Returns (loss, clipped: tokens where the clipped term is the minimum, k3 or None)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_coef * kl
    return loss, clipped < unclipped, kl


def response_scales(lengths: list[int], norm: str) -> list[float]:
    """Each response's per-token weight in the loss's mean, which divides by the sum of all token weights:
    "token", 1 (every token of the batch alike); "sequence", 1 / its trained tokens (every response alike)."""
    return [1.0 if norm == "token" else 1.0 / n if n else 0.0 for n in lengths]


# ---- data ---------------------------------------------------------------------------------------------------
@dataclass
class PlannedPrompt:
    key: str                              # "<dataset>/<id or index>", for logs
    sample: PlannedSample                 # the generation prompt: ids ending in an open assistant turn, visuals
    conversations: list[dict]
    answer: str
    rewards: list[tuple[str, float]]
    thinking: bool = False                # rolled out with thinking on

    @property
    def text(self) -> str:
        return self.conversations[-1]["value"]


def prompt_planner(builder: SampleBuilder, default_rewards: list[tuple[str, float]],
                   thinking: bool | Callable[[str], bool], images_only: bool = False):
    """plan(sample, spec, index) -> PlannedPrompt, for `plan_datasets`; raises DataError on a bad sample.
    thinking: for every prompt, or per prompt key (`GRPOOptions.thinks`); images_only: reject videos (the
    openai backend sends images only)."""
    def plan(sample: dict, spec: DatasetSpec, index: int) -> PlannedPrompt:
        key = f"{spec.name}/{sample.get('id', index)}"
        think = thinking(key) if callable(thinking) else thinking
        preface = "" if think else EMPTY_THINK  # what the reference chat() appends when thinking is off
        conv = prompt_turns(sample)
        answer = sample.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise DataError("empty_answer", "no reference 'answer' (need a non-empty string or a number)")
        try:
            rewards = parse_rewards(sample["reward"]) if sample.get("reward") else default_rewards
        except ValueError as e:
            raise DataError("bad_reward", str(e)) from None
        planned = builder.plan({**sample, "conversations": conv}, spec, index, generation_preface=preface)
        if images_only and planned.kind == "video":
            raise DataError("unsupported", "the openai rollout backend sends images only, not videos")
        return PlannedPrompt(key, planned, conv, answer.strip(), rewards, think)
    return plan


def warn_long_answers(prompts: list[PlannedPrompt], tokenizer, max_new_tokens: int, rank: int) -> None:
    """A reference answer that does not fit in max_new_tokens (with its <|im_end|>) means every rollout of
    that prompt is cut off and scored wrong: no learning signal, silently. Say so once, with an example."""
    long = [(n, p.key) for p in prompts if (n := len(tokenizer.encode(p.answer)) + 1) > max_new_tokens]
    if long and rank == 0:
        n, key = max(long)
        log.warning("%d of %d prompts have reference answers longer than grpo_max_new_tokens = %d (the longest, "
                    "%s, needs %d tokens with <|im_end|>): their rollouts are cut off and score as wrong; raise "
                    "grpo_max_new_tokens", len(long), len(prompts), max_new_tokens, key, n)


def prompt_order(n: int, cfg: TrainConfig) -> list[int]:
    """Prompt indices for all epochs: each epoch shuffled with (seed, epoch)."""
    order = []
    for epoch in range(cfg.epochs):
        perm = list(range(n))
        random.Random(cfg.seed * 1000 + epoch).shuffle(perm)
        order += perm
    return order


# ---- rollouts -----------------------------------------------------------------------------------------------
@dataclass
class Response:
    token_ids: list[int]
    sampled: list[bool]                   # False for forced ids: in the context, not optimised
    text: str                             # decoded, the thinking block included
    thinking_tokens: int


def sample_seed(seed: int, step: int, slot: int, g: int, group_size: int) -> int:
    """The sampling seed of response g of the prompt in global slot `slot` of step `step`."""
    return ((seed * 1_000_003 + step) * 1_000_003 + slot * group_size + g) % (2**63)


def response_room(config: GenerationConfig, tokenizer) -> int:
    """The most ids a response can have: max_new_tokens, plus the forced early-stop text under a budget."""
    budget = config.enable_thinking and config.thinking_budget
    return config.max_new_tokens + (len(tokenizer.encode(EARLY_STOP_TEXT)) if budget else 0)


def engine_rollouts(model: Ovis, tokenizer, prompts: list[TrainSample], config: GenerationConfig,
                    seeds: list[list[int]], max_batch: int,
                    thinking: list[bool] | None = None) -> list[list[Response]]:
    """len(seeds[i]) responses to each prompt, decoded together by one Engine; thinking: per prompt, overriding
    config.enable_thinking."""
    n = sum(len(s) for s in seeds)
    engine = Engine(model, tokenizer, max_batch_size=min(n, max_batch),
                    max_len=max(len(p.input_ids) for p in prompts) + response_room(config, tokenizer))
    owner = {}
    for i, (prompt, group) in enumerate(zip(prompts, seeds)):
        mode = {} if thinking is None else {"enable_thinking": thinking[i]}
        for g, seed in enumerate(group):
            rid = engine.add_request(prompt.input_ids, prompt.pixel_values, prompt.grid_thws,
                                     config.replace(seed=seed, **mode))
            owner[rid] = (i, g)
    ids = {rid: [] for rid in owner}
    sampled = {rid: [] for rid in owner}
    out: list[list[Response | None]] = [[None] * len(group) for group in seeds]
    while engine.has_unfinished():
        for o in engine.step():
            ids[o.request_id] += o.token_ids
            sampled[o.request_id] += [True] + [False] * (len(o.token_ids) - 1)  # one sampled id, then forced ones
            if o.finished:
                i, g = owner[o.request_id]
                text = tokenizer.decode(ids[o.request_id], skip_special_tokens=True).strip()
                out[i][g] = Response(ids[o.request_id], sampled[o.request_id], text, o.result.usage["thinking_tokens"])
    return out


class OpenAIRollouts:
    """Responses from an OpenAI-compatible chat-completions server (`n` = G per request)."""

    def __init__(self, opts: GRPOOptions, tokenizer, client=None):
        if client is None:
            from openai import OpenAI
            client = OpenAI(base_url=opts.rollout_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
        self.client, self.opts, self.tokenizer = client, opts, tokenizer
        self.im_end = tokenizer.token_to_id("<|im_end|>")

    def __call__(self, prompt: PlannedPrompt, seeds: list[int]) -> list[Response]:
        o = self.opts
        extra = {"chat_template_kwargs": {"enable_thinking": prompt.thinking}}
        if prompt.thinking and o.grpo_thinking_budget:
            extra["thinking_budget"] = o.grpo_thinking_budget
        reply = self.client.chat.completions.create(
            model=o.rollout_model, messages=openai_messages(prompt), n=len(seeds), seed=seeds[0],
            temperature=o.grpo_temperature, top_p=o.grpo_top_p, max_tokens=o.grpo_max_new_tokens, extra_body=extra)
        responses = []
        for choice in reply.choices:
            thinking = getattr(choice.message, "reasoning_content", None)
            head = f"<think>\n{thinking}\n</think>\n\n" if thinking else ""
            text = head + (choice.message.content or "")
            ids = self.tokenizer.encode(text) + ([self.im_end] if choice.finish_reason == "stop" else [])
            responses.append(Response(ids, [True] * len(ids), text.strip(), len(self.tokenizer.encode(head))))
        return responses


def openai_messages(prompt: PlannedPrompt) -> list[dict]:
    """Official turns -> chat messages; each `<image>` becomes an image_url part (a data URL) in place."""
    images = iter(path for _, path in prompt.sample.visuals)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = []
    for turn in prompt.conversations:
        chunks = turn["value"].split(IMAGE_TOKEN)
        if len(chunks) == 1:
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
            continue
        parts = []
        for k, chunk in enumerate(chunks):
            if k:
                path = next(images)
                mime = mimetypes.guess_type(path.name)[0] or "image/png"
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
            if chunk.strip():
                parts.append({"type": "text", "text": chunk.strip()})
        messages.append({"role": roles[turn["from"]], "content": parts})
    return messages


def reload_hook(spec: str) -> Callable[[str], None] | None:
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def gather_policy(model: torch.nn.Module, plain: Ovis, cfg: TrainConfig) -> Ovis:
    """Every rank: the current full weights (an all-gather under FSDP) loaded into the plain rollout copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if cfg.lora_rank:
        state = merge_lora_state(state, cfg.lora_alpha / cfg.lora_rank)
    if plain.config.llm_config.tie_word_embeddings:
        state[TIED_KEY] = state["llm.model.embed_tokens.weight"]
    plain.load_state_dict(state)
    return plain


# ---- training batch -----------------------------------------------------------------------------------------
def response_sample(prompt: TrainSample, response: Response) -> TrainSample:
    """Prompt + response ids; labels on the sampled response ids only."""
    n = len(prompt.input_ids)
    labels = [IGNORE_ID] * n + [t if s else IGNORE_ID for t, s in zip(response.token_ids, response.sampled)]
    return TrainSample(torch.cat([prompt.input_ids, torch.tensor(response.token_ids, dtype=torch.long)]),
                       torch.tensor(labels), prompt.pixel_values, prompt.grid_thws)


def all_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def training_rows(samples: list[TrainSample], advantages: list[float], scales: list[float], max_tokens: int,
                  device: torch.device, filler: TrainSample) -> list[dict]:
    """Packed rows, each with per-target `advantages` and `scales` (each sample's own, repeated over its
    targets) and a `weight`: 1, or 0 for padding rows. Every rank gets as many rows as the busiest one -- FSDP
    needs the same forwards everywhere -- by repeating its last row (a tiny `filler` sample when it has none)
    with weight 0."""
    rows = []
    for pack in pack_first_fit([len(s.input_ids) for s in samples], max_tokens):
        batch = collate_packed([samples[i] for i in pack])
        segments = target_segments(batch)
        per_sample = torch.tensor([[advantages[i], scales[i]] for i in pack], dtype=torch.float32)[segments].to(device)
        rows.append({**batch, "advantages": per_sample[:, 0], "scales": per_sample[:, 1], "weight": 1.0})
    n = all_max(len(rows), device)
    if len(rows) < n:
        pad = rows[-1] if rows else {**collate_packed([filler]), "advantages": torch.zeros(1, device=device),
                                     "scales": torch.zeros(1, device=device)}
        rows += [{**pad, "weight": 0.0} for _ in range(n - len(rows))]
    return rows


def score_groups(prompts: list[PlannedPrompt], groups: list[list[Response]], group_size: int, names: list[str]
                 ) -> tuple[torch.Tensor, dict[str, float], Counter]:
    """-> rewards (P, G), {reward_<name>: sum of its unweighted values, n_<name>: responses it scored} for
    every name in `names` (the same keys on every rank), reward errors by name."""
    scorer = RewardScorer()
    rewards, parts = [], {k: 0.0 for name in names for k in (f"reward_{name}", f"n_{name}")}
    for p, group in zip(prompts, groups):
        rewards.append([])
        for resp in group:
            total, values = scorer(p.rewards, p.text, resp.text, p.answer, p.key)
            rewards[-1].append(total)
            for name, v in values.items():
                parts[f"reward_{name}"] += v
                parts[f"n_{name}"] += 1
    return torch.tensor(rewards, dtype=torch.float64).reshape(len(prompts), group_size), parts, scorer.errors


# ---- the loop -----------------------------------------------------------------------------------------------
def train_grpo(cfg: TrainConfig) -> Path:
    """Run GRPO; returns the exported checkpoint directory (or the run directory without export)."""
    opts = phase_options(GRPOOptions, cfg.extra)
    default_rewards = parse_rewards(opts.rewards)
    hook = reload_hook(opts.rollout_reload)
    rank, world, device, out = setup_run(cfg)
    if opts.grpo_prompts_per_step % world:
        raise ValueError(f"grpo_prompts_per_step {opts.grpo_prompts_per_step} is not a multiple of {world} ranks")
    ckpt_root = out / "checkpoints"
    processor, model, lrs = load_policy(cfg)
    dtype = compute_dtype(cfg, device, world)
    tokenizer = processor.tokenizer
    gen_config = opts.generation_config()
    room = response_room(gen_config, tokenizer)
    if room >= cfg.max_tokens:
        raise ValueError(f"max_tokens {cfg.max_tokens} leaves no room for prompts after {room} response tokens")
    builder = SampleBuilder(processor, pixel_budgets(cfg), cfg.max_tokens - room, cfg.on_bad_sample, cfg.num_frames)
    specs = load_datainfo(cfg.datainfo, cfg.datasets or None, formats=("conversation",))
    planner = prompt_planner(builder, default_rewards, opts.thinks, opts.rollout_backend == "openai")
    prompts = plan_datasets(specs, builder, cfg.seed, plan=planner)
    reward_names = sorted({name for p in prompts for name, _ in p.rewards})
    warn_long_answers(prompts, tokenizer, opts.grpo_max_new_tokens, rank)
    order = prompt_order(len(prompts), cfg)
    per_step, G = opts.grpo_prompts_per_step, opts.grpo_group_size
    total_steps = len(order) // per_step if cfg.max_steps is None else cfg.max_steps
    if total_steps < 1 or total_steps * per_step > len(order):
        raise ValueError(f"{len(order)} prompts ({len(prompts)} x {cfg.epochs} epochs) cannot feed {total_steps} "
                         f"steps of {per_step}; add data, epochs or lower max_steps")

    ref = frozen_copy(model) if opts.grpo_kl_coef > 0 else None
    plain = None  # under FSDP the rollout engine runs on a plain copy refreshed from the shards every step
    if parallel_mode(cfg, world) == "fsdp" and opts.rollout_backend == "engine":
        with torch.device(device):
            plain = Ovis(model.config).eval()
        freeze_all(plain)
    model = parallelize(model, cfg, world, device)
    if ref is not None:
        ref = parallelize(ref, cfg, world, device)
    inner = getattr(model, "module", model)
    optimizer, scheduler = make_optimizer(model, lrs, cfg, total_steps * opts.grpo_epochs)
    start_step, skip_counts = resume_latest(model, optimizer, scheduler, ckpt_root, rank)
    remote = OpenAIRollouts(opts, tokenizer) if opts.rollout_backend == "openai" else None
    if remote is not None and hook is None and rank == 0:
        log.warning("rollout_backend=openai without rollout_reload: the server keeps its weights (off-policy)")

    im_end = tokenizer.token_to_id("<|im_end|>")
    filler = TrainSample(torch.tensor([im_end, im_end]), torch.tensor([IGNORE_ID, im_end]), None, None)
    metrics_file = out / "metrics.jsonl"
    progress = progress_bar(cfg, rank, total_steps, start_step)
    if rank == 0:
        log.info("grpo: %d prompts; %d steps of %d prompts x %d responses; %s", len(prompts), total_steps, per_step,
                 G, builder.skips.summary())
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        # 1. rollout: this rank's share of the step's prompts, G responses each
        first = step * per_step + rank * (per_step // world)
        mine, built, seeds = [], [], []
        for slot in range(first, first + per_step // world):
            p = prompts[order[slot]]
            try:
                built.append(builder.build(p.sample))
            except DataError as e:
                if cfg.on_bad_sample == "fail":
                    raise DataError(e.reason, f"{p.key}: {e}") from None
                skip_counts[e.reason] = skip_counts.get(e.reason, 0) + 1
                log.warning("skipping %s: %s", p.key, e)
                continue
            mine.append(p)
            seeds.append([sample_seed(cfg.seed, step, slot, g, G) for g in range(G)])
        if remote is not None:
            export(model, processor, cfg, out / "rollout_weights", rank)
            if hook is not None and rank == 0:
                hook(str(out / "rollout_weights"))
            if dist.is_initialized():
                dist.barrier()
            groups = [remote(p, s) for p, s in zip(mine, seeds)]
        else:
            policy = gather_policy(model, plain, cfg) if plain is not None else inner
            policy.eval()
            groups = engine_rollouts(policy, tokenizer, built, gen_config, seeds, opts.grpo_rollout_batch,
                                     [p.thinking for p in mine]) if mine else []
            inner.train()
        t_rollout = time.perf_counter() - t0

        # 2. rewards and group-normalised advantages
        rewards, parts, errors = score_groups(mine, groups, G, reward_names)
        adv = group_advantages(rewards)
        for name, n in errors.items():
            skip_counts[f"reward_error:{name}"] = skip_counts.get(f"reward_error:{name}", 0) + n
        samples = [response_sample(b, r) for b, group in zip(built, groups) for r in group]
        advantages = adv.flatten().tolist()
        lengths = [int((s.labels != IGNORE_ID).sum()) for s in samples]
        scales = response_scales(lengths, opts.grpo_loss_norm)
        # without a KL term a response with A = 0 has zero loss and gradient: it joins no forward, but it still
        # counts in the normaliser, so the update is the one over all responses
        trained = [i for i, a in enumerate(advantages) if a != 0 or ref is not None]
        rows = training_rows([samples[i] for i in trained], [advantages[i] for i in trained],
                             [scales[i] for i in trained], cfg.max_tokens, device, filler)
        if rank == 0:
            with open(out / "rollouts.jsonl", "a") as f:
                for p, group, rs, advs in zip(mine, groups, rewards.tolist(), adv.tolist()):
                    for resp, r, a in zip(group, rs, advs):
                        f.write(json.dumps({"step": step + 1, "prompt": p.key, "response": resp.text, "reward": r,
                                            "advantage": a}) + "\n")

        # 3. old and reference log-probs, once
        with torch.no_grad():
            for row in rows:
                row["old"] = forward_packed(model, row, device, dtype).token_logps
                if ref is not None:
                    row["ref"] = forward_packed(ref, row, device, dtype).token_logps
        (normaliser,) = all_reduce_sums([sum(n * w for n, w in zip(lengths, scales))], device)
        if not normaliser:
            log.warning("step %d: no response tokens to train on (every prompt was skipped): no update", step + 1)

        # 4. optimisation epochs over the batch
        stats = torch.zeros(3, dtype=torch.float64)  # loss, clipped tokens, kl: means as the loss's
        grad_norm = None
        for epoch in range(opts.grpo_epochs if normaliser else 0):
            sums = torch.zeros(3, dtype=torch.float64)
            for j, row in enumerate(rows):
                with no_grad_sync(model, sync=j == len(rows) - 1):
                    logp = forward_packed(model, row, device, dtype).token_logps
                    loss, clipped, kl = grpo_token_loss(logp, row["old"], row["advantages"], opts.grpo_clip_eps,
                                                        row.get("ref"), opts.grpo_kl_coef)
                    scale = row["scales"]
                    weighted = (loss * scale).sum()
                    (weighted * row["weight"] * world / normaliser).backward()
                kl_sum = (kl * scale).sum() if kl is not None else torch.zeros(())
                sums += row["weight"] * torch.stack([weighted, (clipped * scale).sum(), kl_sum]).detach().double().cpu()
            epoch_stats = torch.tensor(all_reduce_sums(sums.tolist(), device)) / normaliser
            grad_norm = apply_update(model, optimizer, scheduler, cfg, float(epoch_stats[0]),
                                     step * opts.grpo_epochs + epoch)
            stats += epoch_stats / opts.grpo_epochs

        # metrics over all ranks (the same keys, in the same order, everywhere)
        flat = rewards.flatten()
        local = {"responses": len(samples), "reward_sum": float(flat.sum()), "reward_sq": float((flat ** 2).sum()),
                 "response_tokens": sum(len(r.token_ids) for group in groups for r in group),
                 "thinking_tokens": sum(r.thinking_tokens for group in groups for r in group),
                 "groups": len(mine), "zero_groups": int((adv == 0).all(-1).sum()), "trained": len(trained),
                 "reward_errors": sum(errors.values()), **parts}
        total = dict(zip(local, all_reduce_sums(list(local.values()), device)))
        n = max(total["responses"], 1)
        mean = total["reward_sum"] / n
        metrics = {"step": step + 1, "loss": float(stats[0]), "reward_mean": mean,
                 "reward_std": max(total["reward_sq"] / n - mean ** 2, 0.0) ** 0.5,
                 **{f"reward_{k}": total[f"reward_{k}"] / max(total[f"n_{k}"], 1) for k in reward_names},
                 "reward_errors": int(total["reward_errors"]),
                 "zero_advantage_groups": total["zero_groups"] / max(total["groups"], 1),
                 "response_tokens": total["response_tokens"] / n, "thinking_tokens": total["thinking_tokens"] / n,
                 "clip_fraction": float(stats[1]), **({"kl": float(stats[2])} if ref is not None else {}),
                 "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "responses": int(total["responses"]),
                 "trained_responses": int(total["trained"]),
                 "rollout_s": t_rollout, "step_s": time.perf_counter() - t0}
        if rank == 0:
            log_step(metrics_file, metrics, progress, dict(reward=f"{mean:.3f}", loss=f"{metrics['loss']:.4f}",
                                                           len=f"{metrics['response_tokens']:.0f}"))
        save_if_due(model, optimizer, scheduler, ckpt_root, step + 1, total_steps, skip_counts, cfg, rank, world)
    return close_run(model, processor, cfg, out, rank, builder, skip_counts, total_steps, progress)
