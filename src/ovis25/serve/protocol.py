"""OpenAI chat-completions request -> what the Processor and the Engine take, with every field checked.

Sampling: a request without `temperature` uses the server's defaults (greedy unless the server was started
with --generation-config); `temperature: 0` is greedy and any other value samples. vLLM extras accepted:
`top_k` (-1 or 0 disables), `repetition_penalty`, `ignore_eos`, `chat_template_kwargs.enable_thinking`,
`mm_processor_kwargs.images_kwargs.{min_pixels,max_pixels}`; and `thinking_budget` (Ovis2.5's two-phase
cap on thinking tokens).
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

from ..generation import GenerationConfig
from ..processing.processor import CHAT_MAX_PIXELS, CHAT_MIN_PIXELS
from ..processing.video import VIDEO_MAX_PIXELS, VIDEO_NUM_FRAMES
from .errors import APIError
from .media import load_image_url, load_video_url
from .settings import ServerSettings

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_VISUAL_PARTS = {"image_url": "image", "video_url": "video"}
_SHOW = reprlib.Repr()  # request values quoted in errors: short, and safe for any nesting depth
_SHOW.maxstring = _SHOW.maxother = 80


@dataclass
class _MediaRef:
    """An image/video part before its URL is read."""

    url: str
    where: str


@dataclass
class ChatRequest:
    messages: list[dict]  # HF-style messages for the Processor; visual items hold _MediaRef until load_media()
    config: GenerationConfig
    n: int
    stream: bool
    include_usage: bool
    min_pixels: int
    max_pixels: int

    def choice_configs(self) -> list[GenerationConfig]:
        """One config per choice; with a seed, choice i samples with seed + i so the choices differ."""
        return self.config.replies(self.n)

    def load_media(self, settings: ServerSettings) -> None:
        """Read every image/video URL (files, downloads, base64); may block, so call it off the event loop."""
        for message in self.messages:
            if isinstance(message["content"], str):
                continue
            for item in message["content"]:
                ref = item.get(item["type"])
                if isinstance(ref, _MediaRef):
                    item[item["type"]] = (load_image_url(ref.url, ref.where, settings) if item["type"] == "image"
                                          else load_video_url(ref.url, ref.where, settings, VIDEO_NUM_FRAMES))


def parse_chat_request(body: Any, settings: ServerSettings, defaults: GenerationConfig) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_request")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise APIError(404, f"The model {_SHOW.repr(model)} does not exist; this server serves {settings.model_name!r}",
                       "model", "model_not_found")
    _reject_unsupported(body)
    messages, has_video = _parse_messages(body.get("messages"), settings)

    n = _int(body, "n", 1, 1)
    if n > settings.capacity:
        raise APIError(400, f"n={n} is more than this server can hold at once ({settings.capacity} = --max-batch "
                            "+ --max-queue)", "n", "n_too_large")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options", "invalid_type")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")

    min_pixels, max_pixels = _pixel_budget(body, settings, has_video)
    return ChatRequest(messages=messages, config=_generation_config(body, settings, defaults), n=n, stream=stream,
                       include_usage=include_usage, min_pixels=min_pixels, max_pixels=max_pixels)


# ---- messages ----------------------------------------------------------------------------------------------

def _parse_messages(messages: Any, settings: ServerSettings) -> tuple[list[dict], bool]:
    """-> (Processor messages, whether there is a video)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages", "invalid_messages")
    out, num_visual, has_video = [], 0, False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", where, "invalid_messages")
        role = _ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
        if role is None:
            raise APIError(400, f"{where}.role must be one of system, developer, user, assistant; got "
                                f"{_SHOW.repr(message.get('role'))}", f"{where}.role", "invalid_role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts",
                           f"{where}.content", "invalid_content")
        items = []
        for j, part in enumerate(content):
            item = _parse_part(part, f"{where}.content[{j}]", role)
            num_visual += item["type"] != "text"
            has_video |= item["type"] == "video"
            items.append(item)
        if role == "assistant":  # the template renders list contents of assistant turns as empty
            out.append({"role": role, "content": "".join(item["text"] for item in items)})
        else:
            out.append({"role": role, "content": items})
    if num_visual > settings.max_images:
        raise APIError(400, f"the request has {num_visual} images/videos, more than the server's "
                            f"--max-images={settings.max_images}", "messages", "too_many_images")
    return out, has_video


def _parse_part(part: Any, where: str, role: str) -> dict:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise APIError(400, f"{where} must be an object with a 'type'", where, "invalid_content")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.text must be a string", f"{where}.text", "invalid_content")
        return {"type": "text", "text": part["text"]}
    if kind not in _VISUAL_PARTS:
        raise APIError(400, f"{where}: unsupported content type {_SHOW.repr(kind)} (supported: text, image_url, "
                            "video_url)",
                       f"{where}.type", "invalid_content")
    if role == "assistant":
        raise APIError(400, f"{where}: assistant messages can only contain text", where, "invalid_content")
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}.{kind}.url must be a non-empty string", f"{where}.{kind}.url", "invalid_url")
    visual = _VISUAL_PARTS[kind]
    return {"type": visual, visual: _MediaRef(url, where)}


def _reject_unsupported(body: dict) -> None:
    """Options that would change the answer and that this server cannot honour: refuse, do not ignore."""
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported")
    for name in ("tools", "functions"):
        if body.get(name):
            raise APIError(400, f"{name} (function calling) are not supported by this server", name, "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0):
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", name, "unsupported")
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias", "unsupported")


# ---- generation parameters ---------------------------------------------------------------------------------

def _generation_config(body: dict, settings: ServerSettings, defaults: GenerationConfig) -> GenerationConfig:
    limit = settings.max_tokens_limit
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, limit, 1)
    if max_tokens > limit:
        raise APIError(400, f"{name}={max_tokens} is more than the server's --max-tokens-limit={limit}",
                       name, "max_tokens_too_large")
    changes: dict[str, Any] = {"max_new_tokens": max_tokens}

    temperature = _float(body, "temperature", 0.0)
    if temperature is not None:
        changes.update(temperature=temperature, do_sample=temperature > 0)
    top_p = _float(body, "top_p", 0.0)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p", "invalid_value")
        changes["top_p"] = top_p
    if body.get("top_k") is not None:
        changes["top_k"] = max(_int(body, "top_k", 0, -1), 0)  # vLLM uses -1 for "disabled"
    penalty = _float(body, "repetition_penalty", 0.0)
    if penalty is not None:
        if penalty == 0:
            raise APIError(400, "repetition_penalty must be > 0", "repetition_penalty", "invalid_value")
        changes["repetition_penalty"] = penalty
    if body.get("seed") is not None:
        seed = _int(body, "seed", 0, -2**63)
        if seed > 2**63 - 1:
            raise APIError(400, f"seed must fit in a signed 64-bit integer, got {seed}", "seed", "invalid_value")
        changes["seed"] = seed
    if _bool(body, "ignore_eos", False):
        changes["eos_token_ids"] = ()
    changes["stop"] = _stop(body.get("stop"))

    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise APIError(400, "chat_template_kwargs must be an object", "chat_template_kwargs", "invalid_type")
    changes["enable_thinking"] = _bool(kwargs or {}, "enable_thinking", False, "chat_template_kwargs.enable_thinking")
    budget = body.get("thinking_budget")
    if budget is not None:
        budget = _int(body, "thinking_budget", None, 1)
        if budget > limit:  # the thinking phase is not bounded by max_tokens, so bound it here
            raise APIError(400, f"thinking_budget={budget} is more than the server's --max-tokens-limit={limit}",
                           "thinking_budget", "max_tokens_too_large")
    changes["thinking_budget"] = budget
    try:
        return defaults.replace(**changes)
    except ValueError as e:
        raise APIError(400, str(e), None, "invalid_value") from e


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise APIError(400, "stop must be a non-empty string or a list of up to 16 non-empty strings", "stop",
                       "invalid_value")
    return tuple(stops)


def _pixel_budget(body: dict, settings: ServerSettings, has_video: bool) -> tuple[int, int]:
    """Resize budget per image (per frame for a video): Ovis.chat()'s defaults, the official video
    example's max for videos, capped by the server's --max-pixels; explicit values above it are refused."""
    mm = body.get("mm_processor_kwargs")
    if mm is not None and not isinstance(mm, dict):
        raise APIError(400, "mm_processor_kwargs must be an object", "mm_processor_kwargs", "invalid_type")
    images_kwargs = (mm or {}).get("images_kwargs")
    if images_kwargs is not None and not isinstance(images_kwargs, dict):
        raise APIError(400, "mm_processor_kwargs.images_kwargs must be an object",
                       "mm_processor_kwargs.images_kwargs", "invalid_type")
    asked = {}
    for name in ("min_pixels", "max_pixels"):
        param = f"mm_processor_kwargs.images_kwargs.{name}"
        if (images_kwargs or {}).get(name) is not None:
            value = _int(images_kwargs, name, None, 1, param)
            if value > settings.max_pixels:
                raise APIError(400, f"{param}={value} is more than the server's --max-pixels={settings.max_pixels}",
                               param, "pixel_budget_too_large")
            asked[name] = value
    max_pixels = asked.get("max_pixels", min(VIDEO_MAX_PIXELS if has_video else CHAT_MAX_PIXELS, settings.max_pixels))
    min_pixels = asked.get("min_pixels", min(CHAT_MIN_PIXELS, max_pixels))
    if "min_pixels" in asked and "max_pixels" not in asked:
        max_pixels = max(max_pixels, min_pixels)
    if min_pixels > max_pixels:
        raise APIError(400, f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})",
                       "mm_processor_kwargs.images_kwargs", "invalid_value")
    return min_pixels, max_pixels


# ---- field readers -----------------------------------------------------------------------------------------

def _int(obj: dict, name: str, default: int | None, minimum: int | None, param: str | None = None) -> int:
    value = obj.get(name)
    if value is None:
        return default
    param = param or name
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{param} must be an integer, got {_SHOW.repr(value)}", param, "invalid_type")
    if minimum is not None and value < minimum:
        raise APIError(400, f"{param} must be >= {minimum}, got {value}", param, "invalid_value")
    return value


def _float(obj: dict, name: str, minimum: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number, got {_SHOW.repr(value)}", name, "invalid_type")
    if value < minimum:
        raise APIError(400, f"{name} must be >= {minimum:g}, got {value}", name, "invalid_value")
    return float(value)


def _bool(obj: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{param or name} must be true or false, got {_SHOW.repr(value)}", param or name,
                       "invalid_type")
    return value
