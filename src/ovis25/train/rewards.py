"""Reward functions for GRPO: a registry by name, composable with weights.

A reward function has the signature `(prompt: str, response: str, reference: str) -> float`:
  * prompt: the text of the prompt's last human turn (placeholders included);
  * response: the whole decoded response, thinking block included when there is one
    (`<think>\\n...\\n</think>\\n\\nanswer`); `answer_text(response)` gives the part after `</think>`;
  * reference: the sample's `answer` string.
Register your own with

    @register_reward("starts_with_yes")
    def starts_with_yes(prompt: str, response: str, reference: str) -> float:
        return float(answer_text(response).lower().startswith("yes"))

and name it in the recipe (`rewards = ["starts_with_yes:1.0", "format:0.1"]`) or in a sample (`"reward"`).
A spec is `name` or `name:weight` (weight 1 by default); the total reward is the weighted sum. A function
that raises scores 0 for that response; `RewardScorer` counts the error and logs it with the sample id.
"""
from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from ..grounding import parse_boxes
from ..reasoning import THINK_END, THINK_START

log = logging.getLogger(__name__)

RewardFn = Callable[[str, str, str], float]
REWARDS: dict[str, RewardFn] = {}
LENGTH_SCALE = 2000  # characters at which `length_penalty` reaches -1


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a `(prompt, response, reference) -> float` function available under `name`."""
    if not name or ":" in name:
        raise ValueError(f"reward name must be non-empty and contain no ':', got {name!r}")

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return add


def parse_rewards(specs: str | Sequence[str]) -> list[tuple[str, float]]:
    """`["exact:1.0", "format:0.1"]` (or one string) -> [(name, weight)]; unknown names are errors."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("no reward functions given")
    parsed = []
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"reward spec must be a string 'name' or 'name:weight', got {spec!r}")
        name, _, weight = spec.strip().partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} (registered: {sorted(REWARDS)})")
        try:
            parsed.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not a number") from None
    return parsed


class RewardScorer:
    """Applies weighted reward specs; a raising function scores 0 and is counted in `errors[name]`."""

    def __init__(self) -> None:
        self.errors: Counter = Counter()

    def __call__(self, specs: list[tuple[str, float]], prompt: str, response: str, reference: str,
                 sample_id: str) -> tuple[float, dict[str, float]]:
        """-> (weighted total, {name: unweighted value})."""
        total, parts = 0.0, {}
        for name, weight in specs:
            try:
                value = float(REWARDS[name](prompt, response, reference))
                if not math.isfinite(value):
                    raise ValueError(f"returned {value}")
            except Exception as e:  # a user's reward must never crash the run
                self.errors[name] += 1
                log.warning("reward %r failed on sample %s (scored 0): %s: %s", name, sample_id, type(e).__name__, e)
                value = 0.0
            parts[name] = value
            total += weight * value
        return total, parts


# ---- text helpers ------------------------------------------------------------------------------------------
def answer_text(response: str) -> str:
    """The answer: what follows the last `</think>` (the whole response when there is none), stripped."""
    return response.rsplit(THINK_END, 1)[-1].strip()


def normalize(text: str) -> str:
    """strip, lowercase, collapse whitespace, drop trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(string.punctuation + " ")


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)(?:[eE][-+]?\d+)?")
# a leading capital letter (`B`, `(B)`, `B.`, `B) red`) or `answer/option/choice (is) (:) B` anywhere
_CHOICE = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)|(?i:answer|option|choice)\s*(?:is\s*)?:?\s*\(?([A-Za-z])\b")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _choice(text: str) -> str | None:
    m = _CHOICE.search(text.strip())
    return (m.group(1) or m.group(2)).upper() if m else None


# ---- built-ins ---------------------------------------------------------------------------------------------
@register_reward("exact")
def exact(prompt: str, response: str, reference: str) -> float:
    """1 when the answer equals the reference after `normalize` (case, spacing, trailing punctuation)."""
    return float(normalize(answer_text(response)) == normalize(reference))


@register_reward("number")
def number(prompt: str, response: str, reference: str, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> float:
    """1 when the last number of the answer matches the reference number (`1,000` = `1000.0`), within
    max(rel_tol * |reference|, abs_tol)."""
    got, want = _last_number(answer_text(response)), _last_number(reference)
    if want is None:
        raise ValueError(f"reference {reference!r} holds no number")
    return float(got is not None and abs(got - want) <= max(rel_tol * abs(want), abs_tol))


@register_reward("choice")
def choice(prompt: str, response: str, reference: str) -> float:
    """1 when the multiple-choice letter of the answer (`B`, `(B)`, `B.`, `Answer: B`) is the reference's."""
    want = _choice(reference)
    if want is None:
        raise ValueError(f"reference {reference!r} holds no choice letter")
    return float(_choice(answer_text(response)) == want)


@register_reward("iou")
def iou(prompt: str, response: str, reference: str) -> float:
    """Box IoU: for each reference box the best IoU with an answer box, averaged; scaled down by
    n_reference / n_answer when the answer has more boxes (so listing many boxes does not pay)."""
    want, got = parse_boxes(reference), parse_boxes(answer_text(response))
    if not want:
        raise ValueError(f"reference {reference!r} holds no <box>")
    if not got:
        return 0.0
    score = sum(max(w.iou(g) for g in got) for w in want) / len(want)
    return score * min(1.0, len(want) / len(got))


@register_reward("iou50")
def iou50(prompt: str, response: str, reference: str) -> float:
    """1 when `iou` >= 0.5 (the usual grounding accuracy threshold)."""
    return float(iou(prompt, response, reference) >= 0.5)


@register_reward("format")
def format_reward(prompt: str, response: str, reference: str) -> float:
    """1 when the response is `<think>...</think>` (one pair, at the start) followed by a non-empty answer."""
    text = response.strip()
    if not text.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return 0.0
    return float(bool(text.split(THINK_END, 1)[1].strip()))


@register_reward("length_penalty")
def length_penalty(prompt: str, response: str, reference: str) -> float:
    """-len(response) / LENGTH_SCALE characters, floored at -1; weight it (e.g. `length_penalty:0.1`)."""
    return -min(1.0, len(response) / LENGTH_SCALE)
