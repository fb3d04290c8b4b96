"""Grounding in the Ovis2.5 text format.

The target is named as `<ref>red triangle</ref>`; answers are `<box>(x1,y1),(x2,y2)</box>` or
`<point>(x,y)</point>` (several: `[<box>...</box>,<box>...</box>]`), coordinates relative to the image in
[0, 1) with the origin at the top left, written with 3 decimals.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"<box>\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*</box>")
_POINT = re.compile(rf"<point>\s*\({_NUM},{_NUM}\)\s*</point>")
_REF = re.compile(r"<ref>(.*?)</ref>", re.S)


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return self.x1 * width, self.y1 * height, self.x2 * width, self.y2 * height

    def iou(self, other: "Box") -> float:
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


@dataclass(frozen=True)
class Point:
    x: float
    y: float

    def to_pixels(self, width: int, height: int) -> tuple[float, float]:
        return self.x * width, self.y * height


def parse_boxes(text: str) -> list[Box]:
    """All well-formed boxes in the text, in order; corners are sorted so x1 <= x2, y1 <= y2."""
    boxes = []
    for m in _BOX.finditer(text):
        x1, y1, x2, y2 = (float(v) for v in m.groups())
        boxes.append(Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def parse_points(text: str) -> list[Point]:
    return [Point(float(x), float(y)) for x, y in _POINT.findall(text)]


def parse_refs(text: str) -> list[str]:
    return [r.strip() for r in _REF.findall(text)]


def _clip(v: float) -> float:
    return min(max(v, 0.0), 0.999)


def format_box(box: Box | tuple[float, float, float, float], width: int | None = None,
               height: int | None = None) -> str:
    """`<box>(x1,y1),(x2,y2)</box>`; pass width/height to convert from pixel coordinates."""
    x1, y1, x2, y2 = (box.x1, box.y1, box.x2, box.y2) if isinstance(box, Box) else box
    if width is not None and height is not None:
        x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
    return f"<box>({_clip(x1):.3f},{_clip(y1):.3f}),({_clip(x2):.3f},{_clip(y2):.3f})</box>"


def format_point(x: float, y: float, width: int | None = None, height: int | None = None) -> str:
    if width is not None and height is not None:
        x, y = x / width, y / height
    return f"<point>({_clip(x):.3f},{_clip(y):.3f})</point>"


def format_boxes(boxes: list[Box]) -> str:
    return format_box(boxes[0]) if len(boxes) == 1 else "[" + ",".join(format_box(b) for b in boxes) + "]"


def draw_grounding(image: Image.Image, text: str, color: str = "red", width: int = 3) -> Image.Image:
    """A copy of the image with every box and point of `text` drawn on it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for box in parse_boxes(text):
        draw.rectangle(box.to_pixels(out.width, out.height), outline=color, width=width)
    r = max(3, min(out.size) // 100)
    for p in parse_points(text):
        x, y = p.to_pixels(out.width, out.height)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=color, width=width)
    return out
