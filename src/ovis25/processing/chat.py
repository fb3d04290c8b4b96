"""Prompt building: HF chat-template rendering, the official conversation formatter, placeholder ids.

Text placeholders `<image>` / `<video>` become -200 / -201 at tokenization; after preprocessing each one is
expanded into an indicator pair around `-300` visual atoms (see `expand_visual_placeholders`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..constants import (IGNORE_ID, IMAGE_END_ID, IMAGE_START_ID, IMAGE_TOKEN_ID, VIDEO_END_ID,
                         VIDEO_START_ID, VIDEO_TOKEN_ID, VISUAL_ATOM_ID)
from .tokenizer import Tokenizer

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"

EMPTY_THINK = "<think>\n\n</think>\n\n"
ROLE_PREFIX = {"system": "<|im_start|>system\n", "human": "<|im_start|>user\n", "gpt": "<|im_start|>assistant\n"}
TURN_END = "<|im_end|>\n"

# Used when a checkpoint ships no template; renders like the released Ovis2.5 template: images/videos come
# from content items only, list items are joined by newlines, assistant text keeps only what follows the
# last </think>.
DEFAULT_CHAT_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.role == 'system' or message.role == 'user' %}
    {%- if message.content is string %}
        {{- message.content | replace('<image>', '') | replace('<video>', '') }}
    {%- else %}
        {%- for item in message.content %}
            {%- if item.type == 'text' and 'text' in item %}
                {{- item.text | replace('<image>', '') | replace('<video>', '') }}
            {%- elif item.type == 'image' %}
                {{- '<image>' }}
            {%- elif item.type == 'video' %}
                {{- '<video>' }}
            {%- else %}
                {{- raise_exception('Invalid content type. Supported types for system and user are text, image, '
                                    'video.') }}
            {%- endif %}
            {%- if not loop.last %}{{- '\\n' }}{%- endif %}
        {%- endfor %}
    {%- endif %}
{%- elif message.role == 'assistant' %}
    {%- set content = '' %}
    {%- if message.content is string %}
        {%- set content = message.content | replace('<image>', '') | replace('<video>', '') %}
    {%- else %}
        {%- for item in message.content %}
            {%- if item.type == 'text' and 'text' in item %}
                {%- set content = content ~ (item.text | replace('<image>', '') | replace('<video>', '')) %}
            {%- else %}
                {{- raise_exception('Invalid content type. Supported type for assistant is text.') }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- content.split('</think>')[-1].lstrip('\\n') }}
{%- else %}
    {{- raise_exception('Invalid role. Supported roles are system, user, assistant.') }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


def _raise_exception(message: str):
    raise ValueError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def render_chat_template(
    messages: Sequence[dict],
    template: str = DEFAULT_CHAT_TEMPLATE,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    **kwargs,
) -> str:
    """Render HF-style messages like `transformers`' apply_chat_template (sandboxed jinja2).

    `enable_thinking=None` leaves the variable undefined, which the Ovis2.5 template treats as "on".
    """
    validate_messages(messages)
    context = dict(kwargs, messages=messages, add_generation_prompt=add_generation_prompt)
    if enable_thinking is not None:
        context["enable_thinking"] = enable_thinking
    try:
        return _compile(template).render(**context)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from e


def validate_messages(messages: Sequence[dict]) -> None:
    if isinstance(messages, (str, dict)) or not len(messages):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {message!r:.80}")
        if not isinstance(message["role"], str):
            raise ValueError(f"message {i}: 'role' must be a str, got {type(message['role']).__name__}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"message {i}: 'content' must be a str or a list of items, got {type(content).__name__}")
        for j, item in enumerate(content):
            if not isinstance(item, dict) or "type" not in item:
                raise ValueError(f"message {i} item {j}: expected a dict with a 'type' field, got {item!r:.80}")


def tokenize_with_placeholders(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokenize `text` chunk by chunk around `<image>` (or `<video>`), each placeholder becoming its
    negative id, so BPE never merges across a placeholder."""
    has_image, has_video = IMAGE_TOKEN in text, VIDEO_TOKEN in text
    if has_image and has_video:
        raise ValueError("a prompt cannot mix <image> and <video> placeholders")
    token, token_id = (VIDEO_TOKEN, VIDEO_TOKEN_ID) if has_video else (IMAGE_TOKEN, IMAGE_TOKEN_ID)
    ids: list[int] = []
    for k, chunk in enumerate(text.split(token)):
        if k:
            ids.append(token_id)
        ids.extend(tokenizer.encode(chunk))
    return ids


def num_visual_atoms(grid_thw: Sequence[int], hidden_stride: int, temporal_patch_size: int) -> int:
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // hidden_stride**2 // temporal_patch_size


def check_placeholder_counts(input_ids: Sequence[int], num_images: int, num_videos: int) -> None:
    """Fail early (before any pixel work) when placeholders and inputs disagree."""
    n_image, n_video = list(input_ids).count(IMAGE_TOKEN_ID), list(input_ids).count(VIDEO_TOKEN_ID)
    if (n_image or num_images) and (n_video or num_videos):
        raise ValueError(f"a prompt cannot mix images and videos (got {n_image} <image> / {num_images} image(s), "
                         f"{n_video} <video> / {num_videos} video(s))")
    if n_image != num_images:
        raise ValueError(f"the prompt has {n_image} <image> placeholder(s) but {num_images} image(s) were given")
    if n_video != num_videos:
        raise ValueError(f"the prompt has {n_video} <video> placeholder(s) but {num_videos} video(s) were given")


def expand_visual_placeholders(
    input_ids: Sequence[int],
    image_grid_thws: Sequence[Sequence[int]],
    video_grid_thws: Sequence[Sequence[int]],
    hidden_stride: int,
    temporal_patch_size: int,
    labels: Sequence[int] | None = None,
) -> tuple[list[int], list[int] | None]:
    """Replace each -200 by `-301, -300 x atoms, -302` and each -201 by `-303, -300 x atoms, -304`, in order.

    Labels (when given) get IGNORE_ID over every inserted id.
    """
    input_ids = list(input_ids)
    if labels is not None and len(labels) != len(input_ids):
        raise ValueError(f"labels has {len(labels)} entries but input_ids has {len(input_ids)}")
    check_placeholder_counts(input_ids, len(image_grid_thws), len(video_grid_thws))

    grids = {IMAGE_TOKEN_ID: iter(image_grid_thws), VIDEO_TOKEN_ID: iter(video_grid_thws)}
    indicators = {IMAGE_TOKEN_ID: (IMAGE_START_ID, IMAGE_END_ID), VIDEO_TOKEN_ID: (VIDEO_START_ID, VIDEO_END_ID)}
    out_ids: list[int] = []
    out_labels: list[int] = []
    for pos, token in enumerate(input_ids):
        if token in grids:
            start, end = indicators[token]
            atoms = num_visual_atoms(next(grids[token]), hidden_stride, temporal_patch_size)
            block = [start] + [VISUAL_ATOM_ID] * atoms + [end]
            out_ids.extend(block)
            out_labels.extend([IGNORE_ID] * len(block))
        else:
            out_ids.append(token)
            out_labels.append(labels[pos] if labels is not None else IGNORE_ID)
    return out_ids, (out_labels if labels is not None else None)


def format_conversation(
    tokenizer: Tokenizer, conversations: Sequence[dict], generation_preface: str | None = None
) -> tuple[str, list[int], list[int]]:
    """The official Qwen3 conversation formatter on LLaVA-style `from`/`value` turns.

    Returns (prompt_text, input_ids with -200/-201 placeholders, labels).

    generation_preface=None is training: a gpt value without a complete think block gets the empty think
    block inserted; labels cover each gpt turn after its prefix (role line, plus the inserted block) up to
    and including `<|im_end|>`; the final `\\n` is dropped when the conversation ends with gpt.
    Otherwise the turns are used verbatim, labels are all IGNORE_ID, and an open assistant turn
    `<|im_start|>assistant\\n` + generation_preface ends the prompt.
    """
    validate_conversations(conversations)
    if generation_preface is not None and not isinstance(generation_preface, str):
        raise ValueError(f"generation_preface must be None or a str, got {type(generation_preface).__name__}")
    training = generation_preface is None
    texts = [turn["value"] for turn in conversations] + ([] if training else [generation_preface])
    if any(IMAGE_TOKEN in t for t in texts) and any(VIDEO_TOKEN in t for t in texts):
        raise ValueError("a prompt cannot mix <image> and <video> placeholders")

    prompt, input_ids, labels = "", [], []
    for turn in conversations:
        role, value = turn["from"], turn["value"]
        prefix = ROLE_PREFIX[role]
        has_think = "<think>" in value and "</think>" in value
        if training and role == "gpt" and not has_think:
            prefix += EMPTY_THINK
        text = prefix + value + TURN_END
        ids = tokenize_with_placeholders(tokenizer, text)
        turn_labels = [IGNORE_ID] * len(ids)
        if training and role == "gpt":
            # The span starts after the prefix's own token count and stops before the `\n` after <|im_end|>.
            start = len(tokenizer.encode(prefix))
            turn_labels[start:-1] = ids[start:-1]
        prompt += text
        input_ids += ids
        labels += turn_labels

    if training:
        if conversations[-1]["from"] == "gpt":
            input_ids.pop()
            labels.pop()
    else:
        text = ROLE_PREFIX["gpt"] + generation_preface
        ids = tokenize_with_placeholders(tokenizer, text)
        prompt += text
        input_ids += ids
        labels += [IGNORE_ID] * len(ids)
    return prompt, input_ids, labels


def validate_conversations(conversations: Sequence[dict]) -> None:
    if isinstance(conversations, (str, dict)) or not len(conversations):
        raise ValueError("conversations must be a non-empty list of {'from': ..., 'value': ...} dicts")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i}: expected a dict with 'from' and 'value', got {turn!r:.80}")
        if not isinstance(turn["from"], str) or turn["from"] not in ROLE_PREFIX:
            raise ValueError(f"conversation turn {i}: 'from' must be one of {sorted(ROLE_PREFIX)}, "
                             f"got {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"conversation turn {i}: 'value' must be a str, got {type(turn['value']).__name__}")
