"""Answer scoring shared by evaluation and by the verifiable rewards of GRPO.

Every metric has the signature `(response, reference) -> float` in [0, 1].
"""
from __future__ import annotations

import re
import string

from .grounding import parse_boxes

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lowercase, trim, drop surrounding punctuation and collapse spaces (`" Red. "` -> `"red"`)."""
    return " ".join(text.strip().lower().strip(string.punctuation + " ").split())


def exact_match(response: str, reference: str) -> float:
    return float(normalize(response) == normalize(reference))


def number_match(response: str, reference: str, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> float:
    """The first number in the response equals the reference number (within tolerance)."""
    got, want = _NUMBER.search(response), _NUMBER.search(reference)
    if not got or not want:
        return exact_match(response, reference)
    a, b = float(got.group()), float(want.group())
    return float(abs(a - b) <= max(abs_tol, rel_tol * abs(b)))


def choice_match(response: str, reference: str) -> float:
    """Multiple choice: the first standalone option letter (A-Z, optionally `(B)` / `B.`) matches."""
    m = re.search(r"\b([A-Z])\b", response.strip()) or re.search(r"\b([a-z])\b", response.strip())
    want = reference.strip().strip("()").strip(".").upper()[:1]
    return float(bool(m) and m.group(1).upper() == want)


def box_iou(response: str, reference: str) -> float:
    """IoU of the first box in the response with the first reference box (0 if either has none)."""
    got, want = parse_boxes(response), parse_boxes(reference)
    return got[0].iou(want[0]) if got and want else 0.0


METRICS = {"exact": exact_match, "number": number_match, "choice": choice_match, "iou": box_iou}


def score(metric: str, response: str, reference: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric](response, reference)
