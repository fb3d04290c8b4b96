"""`Chat`: the Python chat API (prompt in, reply out) over the generation `Engine`.

    chat = Chat.from_pretrained("AIDC-AI/Ovis2.5-2B-local-dir", dtype=torch.bfloat16, device="cuda")
    res = chat.generate("<image>\\nWhat is this?", images=[Image.open("cat.png")], enable_thinking=True)
    res.text, res.thinking, res.usage
    for delta in chat.stream("Tell me a story."): print(delta, end="")

A conversation is one of:
  * a str: one user turn, like the reference `Ovis.chat(prompt)`;
  * the official from/value list (`{"from": "human"|"gpt"|"system", "value": ...}` with `<image>`/`<video>`
    placeholders, `images`/`videos` given in order), formatted like the reference chat();
  * HF-style messages (`{"role", "content"}`, images as content items), rendered with the checkpoint's
    chat template.
Without sampling options the reply is the reference chat()'s greedy one, token for token.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .generation import EARLY_STOP_TEXT, Engine, GenerationConfig, GenerationResult
from .model import Ovis
from .processing.processor import CHAT_MAX_PIXELS, CHAT_MIN_PIXELS, Processor

THINK_OFF_PREFACE = "<think>\n\n</think>\n\n"  # what the reference appends when thinking is off
_CONFIG_OPTIONS = {f.name for f in fields(GenerationConfig)} - {"eos_token_ids"}
_CACHE_ROUNDING = 256  # round the cache length up so that similar calls reuse one engine

Conversation = str | Sequence[dict]


class Chat:
    def __init__(self, model: Ovis, processor: Processor, generation_config: GenerationConfig | None = None):
        self.model, self.processor = model, processor
        self.generation_config = generation_config or GenerationConfig()  # defaults for every call
        self.engine: Engine | None = None  # created on first use, grown when a call needs more room
        self.last_result: GenerationResult | None = None  # set when a stream() finishes

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        use_generation_config: bool = False) -> "Chat":
        """use_generation_config: take sampling defaults from the checkpoint's generation_config.json
        (the reference chat() ignores it and decodes greedily)."""
        model = Ovis.from_pretrained(path, dtype=dtype, device=device).eval()
        config = GenerationConfig.from_pretrained(path) if use_generation_config else None
        return cls(model, Processor.from_pretrained(path), config)

    # ---- public API ----------------------------------------------------------------------------------

    def generate(self, conversation: Conversation, images: Sequence | None = None, videos: Sequence | None = None,
                 **options: Any) -> GenerationResult:
        """One reply. Options (None or absent = the chat's defaults): enable_thinking, thinking_budget,
        max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed, stop,
        min_pixels, max_pixels."""
        return self.generate_batch([conversation], [images], [videos], **options)[0]

    def generate_batch(self, conversations: Sequence[Conversation], images: Sequence | None = None,
                       videos: Sequence | None = None, n: int = 1, seeds: Sequence[int] | None = None,
                       **options: Any) -> list[GenerationResult]:
        """Several replies decoded together; `images`/`videos` hold one entry (a list or None) per conversation.
        n: replies per conversation (for sampling), each conversation's n in a row; its media are prepared and
        encoded once. When sampling with a seed, reply k of conversation i draws from seed `seeds[i] + k`
        (`seeds`: one per conversation) or `seed + k` (the `seed` option), as the server's choices do: each
        reply depends on its own seed only, not on what else is in the batch."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        images = images if images is not None else [None] * len(conversations)
        videos = videos if videos is not None else [None] * len(conversations)
        if not len(images) == len(videos) == len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists and "
                             f"{len(videos)} video lists")
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(seeds)} seeds")
        config, pixels = self._options(options)
        prompts = [self._prompt(c, i, v, config.enable_thinking, **pixels)
                   for c, i, v in zip(conversations, images, videos)]
        prompts = [p for p in prompts for _ in range(n)]
        per_conversation = [config] * len(conversations) if seeds is None else \
            [config.replace(seed=s) for s in seeds]
        configs = [c for conv in per_conversation for c in conv.replies(n)]
        return self._engine_for(prompts, config).generate(prompts, configs)

    def stream(self, conversation: Conversation, images: Sequence | None = None, videos: Sequence | None = None,
               **options: Any) -> Iterator[str]:
        """Answer text deltas (same options as `generate`); they join to the final `text`, which is then in
        `self.last_result` (with thinking on, a reply that never closes </think> arrives in one last delta,
        as the reference counts it as the answer)."""
        config, pixels = self._options(options)  # bad arguments raise here, not at the first next()
        return self._stream(self._prompt(conversation, images, videos, config.enable_thinking, **pixels), config)

    # ---- helpers -------------------------------------------------------------------------------------

    def _stream(self, prompt: dict, config: GenerationConfig) -> Iterator[str]:
        engine = self._engine_for([prompt], config)
        rid = engine.add_request(prompt["input_ids"], prompt["pixel_values"], prompt["grid_thws"], config)
        try:
            for out in engine.stream(rid):
                if out.text:
                    yield out.text
                if out.finished:
                    self.last_result = out.result
        finally:  # the caller may stop iterating early
            engine.abort(rid)

    def _options(self, options: dict) -> tuple[GenerationConfig, dict]:
        pixels = {name: default if (value := options.pop(name, None)) is None else value
                  for name, default in (("min_pixels", CHAT_MIN_PIXELS), ("max_pixels", CHAT_MAX_PIXELS))}
        unknown = set(options) - _CONFIG_OPTIONS
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(_CONFIG_OPTIONS | set(pixels))}")
        changes = {k: v for k, v in options.items() if v is not None}
        return self.generation_config.replace(**changes), pixels

    def _prompt(self, conversation: Conversation, images, videos, enable_thinking: bool, min_pixels: int,
                max_pixels: int) -> dict:
        """-> {"input_ids" (L,) or (1, L), "pixel_values", "grid_thws"} for one conversation."""
        if isinstance(conversation, str):
            conversation = [{"from": "human", "value": conversation}]
        if not isinstance(conversation, Sequence) or not conversation \
                or not all(isinstance(m, dict) for m in conversation):
            raise ValueError("conversation must be a str or a non-empty list of message dicts")
        if "role" in conversation[0]:
            if images or videos:
                raise ValueError("with role/content messages, pass images and videos as content items "
                                 "({'type': 'image', 'image': ...}), not as images=/videos=")
            return self.processor(conversation, enable_thinking=enable_thinking, min_pixels=min_pixels,
                                  max_pixels=max_pixels)
        if isinstance(images, Image.Image):
            images = [images]
        if videos and isinstance(videos[0], Image.Image):  # one video given as a bare frame list
            videos = [videos]
        input_ids, _, pixel_values, grid_thws = self.processor.format_conversation(
            conversation, images=images, videos=videos, min_pixels=min_pixels, max_pixels=max_pixels,
            generation_preface="" if enable_thinking else THINK_OFF_PREFACE)
        return {"input_ids": input_ids, "pixel_values": pixel_values, "grid_thws": grid_thws}

    def _engine_for(self, prompts: list[dict], config: GenerationConfig) -> Engine:
        """An engine whose cache fits these prompts and the longest reply they may produce."""
        reply = config.max_new_tokens
        if config.enable_thinking and config.thinking_budget:  # phase 1 and the forced text may overshoot
            reply = max(reply, config.thinking_budget + len(self.processor.tokenizer.encode(EARLY_STOP_TEXT)))
        need = max(p["input_ids"].numel() for p in prompts) + reply
        context = self.model.config.llm_config.max_position_embeddings
        if need > context:  # also keeps an absurd max_new_tokens from sizing a huge KV cache
            raise ValueError(f"the prompt ({need - reply} tokens) plus up to {reply} new tokens is more than the "
                             f"model's context length ({context}); lower max_new_tokens")
        engine = self.engine
        if engine is None or engine.max_len < need or engine.max_batch_size < len(prompts):
            slots = max(len(prompts), 0 if engine is None else engine.max_batch_size)
            max_len = -(-need // _CACHE_ROUNDING) * _CACHE_ROUNDING
            self.engine = engine = Engine(self.model, self.processor.tokenizer, max_batch_size=slots, max_len=max_len)
        return engine
