"""Thinking text as users see it (CLI, API `reasoning_content`).

`GenerationResult.thinking` follows the reference chat(): it keeps the literal `<think>` (when generated)
and `</think>` tags. Front ends show only what lies between them.
"""
from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def strip_think_tags(thinking: str) -> str:
    """`<think>\\n...\\n</think>` -> `...` (stripped)."""
    text = thinking.strip().removeprefix(THINK_START).removesuffix(THINK_END)
    return text.strip()


class ReasoningStream:
    """Turns the engine's thinking deltas into tag-free deltas.

    The concatenated output is always a prefix of `strip_think_tags(final thinking)`: text that may still
    turn into a tag, and trailing whitespace (which the final strip drops), is held back until it is
    known to stay.
    """

    def __init__(self) -> None:
        self.raw = ""
        self.emitted = ""

    def push(self, delta: str) -> str:
        self.raw += delta
        text = self.raw.lstrip()
        if THINK_START.startswith(text):  # may still become "<think>"
            return ""
        text = text.removeprefix(THINK_START).lstrip()
        for k in range(len(THINK_END), 0, -1):  # a complete or partial closing tag at the end
            if text.endswith(THINK_END[:k]):
                text = text[:-k]
                break
        return self._emit(text.rstrip())

    def finish(self, final_thinking: str) -> str:
        """The rest of the final reasoning (nothing if it no longer extends what was streamed)."""
        return self._emit(strip_think_tags(final_thinking))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta
