"""Generation: packed prefill + KV-cache decode, sampling, thinking budget and continuous batching.

An `Engine` owns a static `KVCache` with one slot per live request. Requests wait in a queue until a slot
is free. Each `step()` produces one token for every live request:
  * newly admitted prompts are prefilled together in one packed forward (the vision encoder runs once over
    all their images) and their first token is sampled from the last position of each prompt;
  * requests that must append forced text (the thinking-budget early-stop ids) do so in one packed forward
    on top of what their slot already holds -- the prompt is never prefilled twice;
  * everybody else advances by one token in a single batched decode forward.
Finished requests free their slot at once, so new requests can join between any two steps.

Reference behaviour reproduced by default (`Ovis.chat`): greedy, eos = `llm_config.eos_token_id`, no
repetition penalty, result text = `decode(ids, skip_special_tokens=True).strip()`, and the two-phase
thinking budget including its quirks (see `Engine._end_thinking_phase`). One quirk is not reproduced: the
reference masks every `<|endoftext|>` (its pad id) in the ids it is given -- the prompt, and in phase 2 also
the ids phase 1 generated -- and shifts the positions after it; here every id is attended to.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .model.llm import AttnContext, KVCache, apply_linear, small_batch_linear
from .model.ovis import INDICATOR_IDS, VISUAL_ATOM_ID, Ovis

EARLY_STOP_TEXT = ("\n\nConsidering the limited time by the user, I have to give the solution based on the "
                   "thinking directly now.\n</think>\n\n")
THINK_END, IM_END = "</think>", "<|im_end|>"
# As vLLM: lower temperatures are greedy (logits / temperature would overflow to inf and sample NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5

if TYPE_CHECKING:  # the engine itself needs no image libraries
    from .processing.tokenizer import Tokenizer


# ---- parameters and results ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationConfig:
    """Per-request generation parameters. The defaults are those of the reference `Ovis.chat()` (greedy,
    eos from the model config); `from_pretrained` reads a checkpoint's `generation_config.json` instead."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF semantics, over the generated tokens
    seed: int | None = None  # per-request torch.Generator; None uses torch's global RNG
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    eos_token_ids: tuple[int, ...] | None = None  # None: the engine's (llm_config.eos_token_id)
    enable_thinking: bool = False  # split `thinking` off the text at the first </think>
    thinking_budget: int | None = None  # with thinking: force an answer after this many tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {type(self.stop).__name__}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        elif self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        for name in ("temperature", "top_p", "repetition_penalty"):  # torch cannot take ints beyond 64 bits
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    object.__setattr__(self, name, float(value))
                except OverflowError:
                    raise ValueError(f"{name} must be a finite number, got {value!r}") from None
        self._validate()

    def _validate(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.eos_token_ids is not None and any(not is_int(i) or i < 0 for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be non-negative integers, got {self.eos_token_ids!r}")
        if self.thinking_budget is not None and (not is_int(self.thinking_budget) or self.thinking_budget < 0):
            raise ValueError(f"thinking_budget must be an integer >= 0 or None, got {self.thinking_budget!r}")

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "GenerationConfig":
        """Defaults from `generation_config.json` (do_sample, temperature, top_k, top_p, repetition_penalty,
        eos_token_id, max_new_tokens), then `overrides`."""
        path = Path(path)
        data = json.loads((path / "generation_config.json" if path.is_dir() else path).read_text())
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if data.get("eos_token_id") is not None:
            values["eos_token_ids"] = data["eos_token_id"]
        return cls(**{**values, **overrides})

    def replace(self, **changes) -> "GenerationConfig":
        return replace(self, **changes)

    def replies(self, n: int) -> list["GenerationConfig"]:
        """Configs for n sampled replies to one prompt: with a seed, reply k samples with seed + k, so the
        replies differ and each depends on its own seed only."""
        return [self] * n if self.seed is None else [self.replace(seed=self.seed + k) for k in range(n)]


@dataclass
class GenerationResult:
    text: str  # the answer, stripped
    thinking: str  # ids up to and including the first </think> (thinking mode only), stripped
    token_ids: list[int]  # every generated id, forced early-stop ids included
    finish_reason: str  # "stop" (eos or stop string), "length" or "abort"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, thinking_tokens, total_tokens
    request_id: int | str | None = None


@dataclass
class RequestOutput:
    """What one `step()` produced for one request."""

    request_id: int | str
    token_ids: list[int]  # new ids (the sampled one plus any forced ids)
    text: str  # answer text delta
    thinking: str  # thinking text delta
    finished: bool = False
    result: GenerationResult | None = None


@dataclass
class EngineStats:
    prefill_calls: int = 0  # packed forwards over new prompts
    prefill_tokens: int = 0  # prompt positions run through them
    vision_calls: int = 0  # visual tokenizer runs (one per prefill call that has images)
    append_calls: int = 0  # packed forwards appending forced ids to live sequences
    append_tokens: int = 0
    decode_steps: int = 0  # batched one-token forwards


# ---- text ---------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Token ids in, text deltas out, never splitting a multi-byte UTF-8 character.

    A byte-level BPE decode of ids that end in the middle of a character ends in U+FFFD; those ids are held
    until the character completes. Once the text ends on a complete character the byte stream is at a
    character boundary, so later ids decode independently of earlier ones and the concatenated deltas equal
    the decode of all ids.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        self.pending = []
        return text


class _Channel:
    """One text stream (thinking or answer): incremental decode, stop strings, and strip-aware emission so
    that the streamed deltas always form a prefix of the final stripped text."""

    def __init__(self, tokenizer: "Tokenizer", stops: tuple[str, ...]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1  # a stop string may still be completing here
        self.raw = ""  # decoded text, cut before a stop string once one is found
        self.emitted = ""
        self.stopped = False

    def add(self, delta: str) -> None:
        start = max(0, len(self.raw) - self.hold)  # earlier matches would already have been found
        self.raw += delta
        hits = [i for i in (self.raw.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.raw = self.raw[:min(hits)]
            self.stopped = True

    def take(self) -> str:
        visible = self.raw if self.stopped else self.raw[:max(0, len(self.raw) - self.hold)]
        text = visible.strip()  # leading whitespace dropped, trailing held until more text follows
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def finish(self, final: str) -> str:
        """The rest of the final text (nothing when the final text no longer extends the stream)."""
        delta = final[len(self.emitted):] if final.startswith(self.emitted) else ""
        self.emitted = final
        return delta


# ---- sampling -----------------------------------------------------------------------------------------

def sample_token(logits: torch.Tensor, config: GenerationConfig, generated: Sequence[int],
                 generator: torch.Generator | None = None) -> int:
    """Next id from float32 logits (V,): repetition penalty, then greedy or temperature/top-k/top-p sampling
    (the order of HF's processors)."""
    if config.repetition_penalty != 1.0 and generated:
        idx = torch.tensor(sorted(set(generated)), device=logits.device)
        seen = logits[idx]
        logits = logits.index_put((idx,), torch.where(seen < 0, seen * config.repetition_penalty,
                                                      seen / config.repetition_penalty))
    if not config.do_sample or config.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    # A tiny repetition penalty can overflow float32 to inf, which makes the probabilities NaN; clamped, the
    # largest logits tie at the float32 maximum instead.
    finfo = torch.finfo(logits.dtype)
    logits = (logits / config.temperature).clamp(finfo.min, finfo.max)
    if 0 < config.top_k < logits.numel():
        kth = torch.topk(logits, config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > config.top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.index_put((order[drop],), torch.tensor(-math.inf, device=logits.device))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- engine -------------------------------------------------------------------------------------------

@dataclass
class _Request:
    id: int | str
    prompt: torch.Tensor  # (L,) ids with negative visual placeholders
    pixel_values: torch.Tensor | None
    grid_thws: torch.Tensor | None
    config: GenerationConfig
    eos: frozenset[int]
    generator: torch.Generator | None
    limit: int  # finish (or end the thinking phase) at this many generated ids
    in_budget_phase: bool
    channels: dict[str, _Channel]
    channel: str  # where decoded text goes now
    token_ids: list[int] = field(default_factory=list)
    feed: list[int] = field(default_factory=list)  # ids the next forward appends to the cache
    slot: int | None = None
    finish_reason: str | None = None


class Engine:
    """Continuous-batching generator over an `Ovis` model.

    engine = Engine(model, tokenizer, max_batch_size=4, max_len=2048)
    rid = engine.add_request(input_ids, pixel_values, grid_thws, GenerationConfig(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...           # RequestOutput: deltas, and `result` once finished
    or, for one request at a time: `for out in engine.stream(rid)`, or `engine.generate(prompts, configs)`.
    """

    def __init__(self, model: Ovis, tokenizer: "Tokenizer", max_batch_size: int = 8, max_len: int = 4096,
                 eos_token_ids: int | Iterable[int] | None = None, compile_decode: bool = False):
        """compile_decode: run the decode step's projections and LM head through a torch.compile'd
        matrix-vector kernel (CPU, up to 8 sequences per step; see `model.llm.small_batch_linear`): ~1.5x
        faster decoding on CPU, a few seconds of compilation on first use, float results equal up to
        rounding (not bit-identical to the default path)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.model, self.tokenizer = model, tokenizer
        llm_config = model.config.llm_config
        eos = llm_config.eos_token_id if eos_token_ids is None else eos_token_ids
        self.eos_token_ids = tuple([eos] if isinstance(eos, int) else eos or ())
        # Read from the loaded tokenizer: the reference hard-codes Qwen3's ids for these two.
        self.think_end_id = tokenizer.token_to_id(THINK_END)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        self.early_stop_ids = tokenizer.encode(EARLY_STOP_TEXT)
        weight = model.llm.model.embed_tokens.weight  # not the LM head: quantization may replace it
        self.device = weight.device
        self.decode_linear = small_batch_linear if compile_decode else apply_linear
        self.cache = KVCache(llm_config, max_batch_size, max_len, weight.dtype, weight.device)
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.free_slots = list(range(max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._backlog: dict[int | str, list[RequestOutput]] = {}  # outputs stepped out for another stream()

    # -- public API --

    def add_request(self, input_ids: torch.Tensor | Sequence[int], pixel_values: torch.Tensor | None = None,
                    grid_thws: torch.Tensor | None = None, config: GenerationConfig | None = None,
                    request_id: int | str | None = None) -> int | str:
        """Queue a prompt (ids already expanded by the Processor, (L,) or (1, L)); returns its id."""
        config = config or GenerationConfig()
        prompt = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty (L,) or (1, L) sequence, got shape {tuple(prompt.shape)}")
        if prompt.numel() > self.max_len:
            raise ValueError(f"prompt has {prompt.numel()} tokens but the KV cache holds max_len={self.max_len}")
        self._check_visuals(prompt, pixel_values, grid_thws)
        if request_id is None:
            request_id = next(self._ids)
        if any(r.id == request_id for r in itertools.chain(self.waiting, self.running)):
            raise ValueError(f"request_id {request_id!r} is already in use")
        budget = config.enable_thinking and bool(config.thinking_budget)
        generator = None
        if config.do_sample and config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.waiting.append(_Request(
            id=request_id, prompt=prompt, pixel_values=pixel_values, grid_thws=grid_thws, config=config,
            eos=frozenset(config.eos_token_ids if config.eos_token_ids is not None else self.eos_token_ids),
            generator=generator, limit=config.thinking_budget if budget else config.max_new_tokens,
            in_budget_phase=budget,
            channels={name: _Channel(self.tokenizer, config.stop) for name in ("thinking", "text")},
            channel="thinking" if config.enable_thinking else "text"))
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: int | str) -> None:
        """Drop a request (e.g. its client went away); its slot is free for the next step."""
        for r in list(self.waiting):
            if r.id == request_id:
                self.waiting.remove(r)
        for r in self.running:
            if r.id == request_id:
                self._finish(r, "abort")
        self.running = [r for r in self.running if r.finish_reason is None]
        self._backlog.pop(request_id, None)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One token for every live request; admits waiting requests into free slots."""
        outputs = []
        decoding = [r for r in self.running if len(r.feed) == 1]
        appending = [r for r in self.running if len(r.feed) > 1]
        if decoding:
            outputs += self._accept_all(decoding, self._decode(decoding))
        if appending:
            outputs += self._accept_all(appending, self._append(appending))
        admitted = []
        while self.waiting and self.free_slots:
            r = self.waiting.popleft()
            r.slot = self.free_slots.pop()
            self.cache.reset([r.slot])
            admitted.append(r)
        if admitted:
            try:
                logits = self._prefill(admitted)
            except Exception:  # drop these prompts but keep the engine usable for the others
                self.free_slots += [r.slot for r in admitted]
                raise
            self.running += admitted
            outputs += self._accept_all(admitted, logits)
        self.running = [r for r in self.running if r.finish_reason is None]
        return outputs

    def generate(self, prompts: Sequence[dict], configs: GenerationConfig | Sequence[GenerationConfig] | None = None
                 ) -> list[GenerationResult]:
        """Run prompts ({"input_ids", "pixel_values", "grid_thws"}, as the Processor returns) to completion,
        batched; results in input order."""
        if configs is None or isinstance(configs, GenerationConfig):
            configs = [configs] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"got {len(configs)} configs for {len(prompts)} prompts")
        ids = []
        try:
            for p, c in zip(prompts, configs):
                ids.append(self.add_request(p["input_ids"], p.get("pixel_values"), p.get("grid_thws"), c))
            return [out.result for i in ids for out in self.stream(i) if out.finished]
        except BaseException:  # leave no request behind to run on in the next call
            for i in ids:
                self.abort(i)
            raise

    def stream(self, request_id: int | str) -> Iterator[RequestOutput]:
        """One request's outputs until it finishes (or is aborted), stepping the engine as needed. Outputs
        of other requests produced meanwhile are kept for their own `stream()`, so streams can interleave."""
        while True:
            outputs = self._backlog.pop(request_id, [])
            if not outputs:
                if not any(r.id == request_id for r in itertools.chain(self.waiting, self.running)):
                    return
                for out in self.step():
                    self._backlog.setdefault(out.request_id, []).append(out)
            for out in outputs:
                yield out
                if out.finished:
                    return

    # -- forwards --

    def _logits(self, hidden: torch.Tensor, linear=apply_linear) -> torch.Tensor:
        return linear(hidden, self.model.llm.lm_head)[0].float()

    def _prefill(self, reqs: list[_Request]) -> torch.Tensor:
        """All new prompts in one packed forward; the vision encoder sees all their images at once, and once per
        pixel tensor: requests given the same tensor (samples of one prompt, GRPO's groups) share its encoding."""
        ids = torch.cat([r.prompt for r in reqs])[None].to(self.device)
        visual = [r for r in reqs if r.pixel_values is not None]
        visual_embeds = None
        if visual:
            unique = list({id(r.pixel_values): r for r in visual}.values())
            pixel_values = torch.cat([r.pixel_values for r in unique]).to(self.device, self.cache.k[0].dtype)
            grid_thws = torch.cat([torch.as_tensor(r.grid_thws) for r in unique]).to(self.device)
            encoded = self.model.visual_embeddings(pixel_values, grid_thws)  # (atoms of the unique requests, H)
            atoms = [int((r.prompt == VISUAL_ATOM_ID).sum()) for r in unique]
            by_tensor = dict(zip((id(r.pixel_values) for r in unique), encoded.split(atoms)))
            visual_embeds = torch.cat([by_tensor[id(r.pixel_values)] for r in visual])
        embeds = self.model.merge_embeddings(ids, visual_embeds=visual_embeds)
        lengths = [r.prompt.numel() for r in reqs]
        hidden = self._forward_packed(embeds, lengths, reqs)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(lengths)
        self.stats.vision_calls += bool(visual)
        return self._logits(hidden)

    def _append(self, reqs: list[_Request]) -> torch.Tensor:
        """Forced ids of several live sequences, each appended after what its slot holds."""
        ids = torch.tensor([i for r in reqs for i in r.feed], device=self.device)[None]
        embeds = self.model.llm.model.embed_tokens(ids)
        lengths = [len(r.feed) for r in reqs]
        hidden = self._forward_packed(embeds, lengths, reqs)
        self.stats.append_calls += 1
        self.stats.append_tokens += sum(lengths)
        return self._logits(hidden)

    def _forward_packed(self, embeds: torch.Tensor, lengths: list[int], reqs: list[_Request]) -> torch.Tensor:
        """Packed (1, T) forward into the requests' slots -> hidden state at each segment's last position."""
        slots = [r.slot for r in reqs]
        starts = self.cache.lengths[slots].tolist()
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])[None].to(self.device)
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=self.device)
        hidden = self.model.llm(embeds, positions, AttnContext(cu_seqlens=cu, cache=self.cache, slots=slots))
        return hidden[0, cu[1:].long() - 1]

    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        slots = [r.slot for r in reqs]
        ids = torch.tensor([[r.feed[0]] for r in reqs], device=self.device)
        positions = self.cache.lengths[slots][:, None].to(self.device)
        hidden = self.model.llm(self.model.llm.model.embed_tokens(ids), positions,
                                AttnContext(cache=self.cache, slots=slots, linear=self.decode_linear))
        self.stats.decode_steps += 1
        return self._logits(hidden[:, 0], self.decode_linear)

    # -- bookkeeping --

    def _accept_all(self, reqs: list[_Request], logits: torch.Tensor) -> list[RequestOutput]:
        if all(not r.config.do_sample and r.config.repetition_penalty == 1.0 for r in reqs):
            tokens = logits.argmax(-1).tolist()
        else:
            tokens = [sample_token(row, r.config, r.token_ids, r.generator) for r, row in zip(reqs, logits)]
        return [self._accept(r, t) for r, t in zip(reqs, tokens)]

    def _accept(self, r: _Request, token: int) -> RequestOutput:
        new = [token]
        self._push(r, [token])
        n = len(r.token_ids)
        if self._stopped(r):
            self._finish(r, "stop")
        elif token in r.eos or n >= r.limit:
            if r.in_budget_phase:
                new += self._end_thinking_phase(r, token)
            else:
                self._finish(r, "stop" if token in r.eos else "length")
        else:
            self._feed(r, [token])
        return self._output(r, new)

    def _end_thinking_phase(self, r: _Request, token: int) -> list[int]:
        """The reference's phase 1 -> phase 2 switch, done on the live cache. Returns forced ids.

        <|im_end|> in phase 1 ends everything; otherwise, unless phase 1 produced </think> itself, the
        early-stop ids are appended; the answer may then use max_new_tokens minus everything so far, and if
        nothing is left the result keeps the forced ids (so it can exceed max_new_tokens)."""
        r.in_budget_phase = False
        if self.im_end_id in r.token_ids:
            self._finish(r, "stop")
            return []
        forced = [] if self.think_end_id in r.token_ids else list(self.early_stop_ids)
        forced = forced[:self._push(r, forced)]
        r.limit = r.config.max_new_tokens
        if self._stopped(r):
            self._finish(r, "stop")
        elif len(r.token_ids) >= r.limit:
            self._finish(r, "length")
        else:
            self._feed(r, [token] + forced)
        return forced

    def _push(self, r: _Request, ids: list[int]) -> int:
        """Record generated/forced ids and route their text to the thinking or answer channel, up to a stop
        string; returns how many ids were taken."""
        for n, i in enumerate(ids, 1):
            r.token_ids.append(i)
            ch = r.channels[r.channel]
            ch.add(ch.decoder.push(i))
            if r.channel == "thinking" and i == self.think_end_id:
                r.channel = "text"
            if ch.stopped:
                return n
        return len(ids)

    @staticmethod
    def _stopped(r: _Request) -> bool:
        return any(ch.stopped for ch in r.channels.values())

    def _feed(self, r: _Request, ids: list[int]) -> None:
        if int(self.cache.lengths[r.slot]) + len(ids) > self.max_len:
            self._finish(r, "length")  # the cache is full
        else:
            r.feed = ids

    def _finish(self, r: _Request, reason: str) -> None:
        r.finish_reason, r.feed = reason, []
        self.cache.reset([r.slot])
        self.free_slots.append(r.slot)

    def _output(self, r: _Request, new: list[int]) -> RequestOutput:
        if r.finish_reason is None:
            return RequestOutput(r.id, new, r.channels["text"].take(), r.channels["thinking"].take())
        result = self._result(r)
        return RequestOutput(r.id, new, r.channels["text"].finish(result.text),
                             r.channels["thinking"].finish(result.thinking), True, result)

    def _result(self, r: _Request) -> GenerationResult:
        """Split and decode exactly as the reference chat(), then cut at the stop string if one was hit."""
        ids, decode = r.token_ids, self.tokenizer.decode
        k = ids.index(self.think_end_id) + 1 if r.config.enable_thinking and self.think_end_id in ids else 0
        thinking, text = decode(ids[:k], skip_special_tokens=True), decode(ids[k:], skip_special_tokens=True)
        for name, ch in r.channels.items():
            if ch.stopped:
                if name == "thinking" and k:
                    thinking, text = ch.raw, ""
                else:  # the answer, or thinking text that never reached </think> and so is the answer
                    text = ch.raw
        usage = {"prompt_tokens": r.prompt.numel(), "completion_tokens": len(ids), "thinking_tokens": k,
                 "total_tokens": r.prompt.numel() + len(ids)}
        return GenerationResult(text.strip(), thinking.strip(), list(ids), r.finish_reason, usage, r.id)

    def _check_visuals(self, prompt: torch.Tensor, pixel_values, grid_thws) -> None:
        """Catch bad inputs here, where they belong to one request, not later inside a shared prefill."""
        vocab = self.model.config.llm_config.vocab_size
        bad = prompt[((prompt < 0) & (prompt != VISUAL_ATOM_ID) & ((prompt > INDICATOR_IDS[0])
                                                                  | (prompt < INDICATOR_IDS[-1]))) | (prompt >= vocab)]
        if bad.numel():
            raise ValueError(f"input_ids contain invalid id(s) {sorted(set(bad.tolist()))} (unexpanded "
                             f"<image>/<video> placeholders or ids >= vocab size {vocab})")
        atoms = int((prompt == VISUAL_ATOM_ID).sum())
        if (pixel_values is None) != (grid_thws is None):
            raise ValueError("pixel_values and grid_thws must be given together")
        expected = 0 if grid_thws is None else self.model.num_visual_atoms(torch.as_tensor(grid_thws))
        if atoms != expected:
            raise ValueError(f"input_ids have {atoms} visual atom positions but grid_thws describe {expected}")
        if grid_thws is not None and pixel_values.shape[0] != int(torch.as_tensor(grid_thws).prod(-1).sum()):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thws describe "
                             f"{int(torch.as_tensor(grid_thws).prod(-1).sum())} patches")
