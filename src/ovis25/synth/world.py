"""Seeded generators of small synthetic images with verifiable questions and short answers.

Each task is a function `task(rng) -> Sample` that draws one example and keeps in `meta` what its answer
was derived from, so tests can check every answer against the pixels. Shapes are drawn without
antialiasing in four pure colours on white, so a colour mask recovers them exactly; only text (OCR, chart
labels) is antialiased, and it is black. Images are 64-256 px per side with varied aspect ratios, so a
model has to cope with native resolutions.

Besides the question and answer, a sample carries what the other training formats need: a caption
(single-image scenes), the steps of a correct reasoning trace, a plausible wrong first step (for
self-correcting traces), a plausible wrong answer and a trace that reasons consistently to it from a
misreading of the image (for preference pairs).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from ..grounding import format_box

COLORS = {"red": (220, 30, 30), "green": (30, 150, 40), "blue": (30, 60, 220), "yellow": (235, 190, 0)}
SHAPES = ("circle", "square", "triangle")
KINDS = [(s, c) for s in SHAPES for c in COLORS]  # every (shape, colour) an object can have
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
# OCR font sizes: a glyph at least one visual token (32 px) wide, as a real run reads small text by giving the
# image more tokens; the OCR task's margins keep its images within the demo's 25-token budget (160 x 160 px).
TEXT_SIZES = (64, 80)
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
WORDS = ("cat", "dog", "sun", "box", "map", "cup", "hat", "bus", "pen", "fox", "owl", "car", "key", "egg",
         "tree", "fish", "star", "moon", "book", "door")
DIRECTIONS = ("left", "right", "up", "down")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
RECOUNT, RECHECK = "Wait, let me recount.", "Wait, let me check again."


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, both ends inclusive (as PIL draws them)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2

    def rel_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box in [0, 1) image coordinates, covering whole pixels."""
        x0, y0, x1, y1 = self.box
        return x0 / width, y0 / height, (x1 + 1) / width, (y1 + 1) / height

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict) -> "Obj":
        return cls(d["shape"], d["color"], tuple(d["box"]))


@dataclass
class Sample:
    task: str
    images: list[Image.Image]        # one image, two images, or the frames of one clip
    question: str
    answer: str
    metric: str                      # how a prediction is scored: "exact", "number" or "iou"
    video: bool = False              # `images` are the frames of one clip
    caption: str | None = None       # single-image samples only
    reasoning: list[str] = field(default_factory=list)  # the steps of a correct thinking trace
    slip: str = ""                   # a plausible wrong version of reasoning[slip_at], caught by `recheck`
    slip_at: int = 0
    recheck: str = RECHECK
    wrong: str = ""                  # a plausible wrong answer
    # the steps of a trace as long as `reasoning` that misreads the image and reasons consistently to `wrong`
    misled: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The human turn with placeholders, laid out as the chat template renders image/video items."""
        placeholders = "<video>\n" if self.video else "<image>\n" * len(self.images)
        return placeholders + self.question


# ---- drawing ---------------------------------------------------------------------------------------

def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def describe(objs: list[Obj]) -> str:
    """'three red circles and a blue square': groups of equal objects in order of first appearance."""
    groups: dict[str, int] = {}
    for o in objs:
        groups[o.name] = groups.get(o.name, 0) + 1
    parts = [f"{NUMBER_WORDS[n]} {plural(name, n)}" for name, n in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def place_name(obj: Obj, size: tuple[int, int]) -> str:
    """Where an object's centre lies in thirds of the image: 'top left', 'top', ..., 'centre', ..., 'bottom right'."""
    col, row = (min(2, int(3 * c / side)) for c, side in zip(obj.center, size))
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def scene_caption(objs: list[Obj], size: tuple[int, int]) -> str:
    """'two red circles and a blue square: a red circle at the top left, ...': what, then where."""
    return describe(objs) + ": " + ", ".join(f"a {o.name} at the {place_name(o, size)}" for o in objs)


def draw_obj(draw: ImageDraw.ImageDraw, obj: Obj, fill: tuple[int, ...] | int | None = None) -> None:
    """Draw `obj` in its colour, or in `fill` (a label map draws class ids with the same geometry)."""
    x0, y0, x1, y1 = obj.box
    fill = COLORS[obj.color] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    else:
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)


def render(size: tuple[int, int], objs: list[Obj]) -> Image.Image:
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    for o in objs:
        draw_obj(draw, o)
    return image


def apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    """Boxes at least `gap` pixels apart, so every object stays its own connected component."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def place(rng: random.Random, size: tuple[int, int], specs: list[tuple[str, str, int]],
          avoid: tuple[tuple[int, ...], ...] = (), gap: int = 4, margin: int = 3) -> list[Obj] | None:
    """Non-touching objects (shape, color, side) at random positions, or None if they do not fit."""
    w, h = size
    taken, objs = list(avoid), []
    for shape, color, side in specs:
        for _ in range(100):
            x0, y0 = rng.randint(margin, w - side - margin), rng.randint(margin, h - side - margin)
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if all(apart(box, t, gap) for t in taken):
                break
        else:
            return None
        taken.append(box)
        objs.append(Obj(shape, color, box))
    return objs


def scene(rng: random.Random, kinds: list[tuple[str, str]], lo: int = 80, hi: int = 256,
          ) -> tuple[Image.Image, list[Obj]]:
    """A canvas of random size (aspect ratio up to 2.5) with one object per (shape, color); redrawn until
    everything fits."""
    while True:
        w = rng.randint(lo, hi)
        size = w, rng.randint(max(lo, round(w / 2.5)), min(hi, round(w * 2.5)))
        specs = [(s, c, max(12, round(rng.uniform(0.18, 0.3) * min(size)))) for s, c in kinds]
        objs = place(rng, size, specs)
        if objs is not None:
            return render(size, objs), objs


GRID = 64  # px: at the demo's smallest image budget (64 x 64) a 2 x 2 grid of visual tokens, 32 px each


def grid_scene(rng: random.Random, kinds: list[tuple[str, str]]) -> tuple[Image.Image, list[Obj]]:
    """One object per visual token: each (shape, color) of `kinds` (at most 4) inside its own 32 x 32 quadrant
    of a 64 x 64 image, so that no token holds two objects and little of each is background."""
    cell, objs = GRID // 2, []
    cells = [(x, y) for y in (0, cell) for x in (0, cell)]
    for (shape, color), (cx, cy) in zip(kinds, rng.sample(cells, len(kinds))):
        side = rng.randint(22, 28)
        x0, y0 = cx + rng.randint(2, cell - 2 - side), cy + rng.randint(2, cell - 2 - side)
        objs.append(Obj(shape, color, (x0, y0, x0 + side - 1, y0 + side - 1)))
    return render((GRID, GRID), objs), objs


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no system fonts needed


def distractors(rng: random.Random, shape: str, color: str, k: int) -> list[tuple[str, str]]:
    """k objects that differ from (shape, color) in both shape and colour."""
    others = [(s, c) for s in SHAPES if s != shape for c in COLORS if c != color]
    return [rng.choice(others) for _ in range(k)]


def counting(rng: random.Random, shape: str, n: int) -> tuple[Image.Image, list[Obj], str]:
    """n objects of one shape in one colour, plus up to two distractors; -> image, objects, colour."""
    color = rng.choice(list(COLORS))
    image, objs = scene(rng, [(shape, color)] * n + distractors(rng, shape, color, rng.randint(0, 2)), lo=96)
    return image, objs, color


def near(rng: random.Random, n: int, lo: int, hi: int) -> int:
    """A plausible wrong number: n - 1 or n + 1, kept within [lo, hi]."""
    return rng.choice([m for m in (n - 1, n + 1) if lo <= m <= hi])


# ---- tasks -----------------------------------------------------------------------------------------

def count(rng: random.Random) -> Sample:
    shape, n = rng.choice(SHAPES), rng.randint(1, 5)
    image, objs, color = counting(rng, shape, n)
    wrong = near(rng, n, 1, 6)

    def seen(k: int) -> str:
        return "I see " + ", ".join(f"{shape} {i}" for i in range(1, k + 1)) + "."

    def trace(k: int) -> list[str]:  # counting k of them
        return [f"I need to count the {shape}s.", seen(k),
                f"So there {'is' if k == 1 else 'are'} {k} {plural(shape, k)}."]

    return Sample(
        "count", [image], f"How many {shape}s are there?", str(n), "number",
        caption=scene_caption(objs, image.size),
        reasoning=trace(n), slip=seen(wrong), slip_at=1, recheck=RECOUNT, wrong=str(wrong), misled=trace(wrong),
        meta={"shape": shape, "color": color, "count": n, "objects": [o.to_dict() for o in objs]})


def attribute(rng: random.Random) -> Sample:
    k = rng.randint(1, 3)
    image, objs = scene(rng, list(zip(rng.sample(SHAPES, k), rng.sample(list(COLORS), k))))
    target = objs[0]
    if rng.random() < 0.5:
        question, answer, asked = f"What color is the {target.shape}?", target.color, "color"
        wrong = rng.choice([c for c in COLORS if c != target.color])
        subject, misseen = f"the {target.shape}", f"{wrong} {target.shape}"
    else:
        question, answer, asked = f"What shape is the {target.color} object?", target.shape, "shape"
        wrong = rng.choice([s for s in SHAPES if s != target.shape])
        subject, misseen = f"the {target.color} object", f"{target.color} {wrong}"

    def trace(seen: str, reply: str) -> list[str]:
        return [f"I look for {subject}.", f"It is a {seen}.", f"So the answer is {reply}."]

    return Sample(
        "attribute", [image], question, answer, "exact", caption=scene_caption(objs, image.size),
        reasoning=trace(target.name, answer), slip=f"It looks like a {misseen}.", slip_at=1, wrong=wrong,
        misled=trace(misseen, wrong),
        meta={"asked": asked, "target": target.to_dict(), "objects": [o.to_dict() for o in objs]})


RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # axis, sign of a - b


def spatial(rng: random.Random, layout: Callable | None = None) -> Sample:
    """Is the first named object <relation> the second? `layout(rng, kinds)` draws the scene (default `scene`)."""
    relation, truth = rng.choice(list(RELATIONS)), rng.random() < 0.5
    axis, sign = RELATIONS[relation]
    kinds = rng.sample(KINDS, 3)[: rng.randint(2, 3)]
    while True:  # the relation must hold (or fail) clearly: centres >= 20% of the side apart
        image, objs = (layout or scene)(rng, kinds)
        a, b = objs[0], objs[1]
        d = (a.center[axis] - b.center[axis]) / image.size[axis]
        if abs(d) >= 0.2 and (d * sign > 0) == truth:
            break
    answer, coord = ("yes" if truth else "no"), "xy"[axis]
    pa, pb = (round(o.center[axis] / image.size[axis], 1) for o in (a, b))

    def trace(xa: float, xb: float, holds: bool) -> list[str]:  # a at xa and b at xb, so the relation holds or not
        claim = f"the {a.name} is {'' if holds else 'not '}{relation} the {b.name}"
        return [f"The {a.name} is at {coord} {xa}.", f"The {b.name} is at {coord} {xb}.",
                f"{xa} is {'less' if xa < xb else 'more'} than {xb}, so {claim}.",
                f"So the answer is {'yes' if holds else 'no'}."]

    return Sample(
        "spatial", [image], f"Is the {a.name} {relation} the {b.name}?", answer, "exact",
        caption=scene_caption(objs, image.size),
        reasoning=trace(pa, pb, truth),
        slip=f"At first the {a.name} seems {'not ' if truth else ''}{relation} the {b.name}.",
        wrong="no" if truth else "yes", misled=trace(pb, pa, not truth),  # the places swapped
        meta={"relation": relation, "a": a.to_dict(), "b": b.to_dict(), "objects": [o.to_dict() for o in objs]})


def ocr(rng: random.Random) -> Sample:
    if rng.random() < 0.6:
        digits = rng.randint(1, 4)
        text, kind = str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)), "number"
        pool = "0123456789"
    else:
        text, kind, pool = rng.choice(WORDS), "word", "abcdefghijklmnopqrstuvwxyz"
    size = rng.randint(*TEXT_SIZES)
    left, top, right, bottom = font(size).getbbox(text)
    tw, th = right - left, bottom - top
    w, h = max(64, tw + rng.randint(8, 48)), max(64, th + rng.randint(8, 32))
    x, y = rng.randint(4, w - tw - 4), rng.randint(4, h - th - 4)
    image = Image.new("RGB", (w, h), WHITE)
    ImageDraw.Draw(image).text((x - left, y - top), text, font=font(size), fill=BLACK)
    i = rng.randrange(len(text))  # a misread: one character changed (never a leading zero)
    wrong = text[:i] + rng.choice([c for c in pool if c != text[i] and (i or c != "0")]) + text[i + 1:]
    return Sample(
        "ocr", [image], f"What {kind} is written?", text, "exact", caption=f"the {kind} {text}",
        reasoning=[f"I read the characters one by one: {', '.join(text)}.", f"So the {kind} is {text}."],
        slip=f"It looks like {wrong}.", wrong=wrong,
        misled=[f"I read the characters one by one: {', '.join(wrong)}.", f"So the {kind} is {wrong}."],
        meta={"text": text, "kind": kind, "font_size": size, "box": [x, y, x + tw - 1, y + th - 1]})


def chart(rng: random.Random) -> Sample:
    n, kind = rng.randint(3, 4), rng.choice(("value", "highest", "sum"))
    labels = "ABCD"[:n]
    while True:
        values = [rng.randint(1, 9) for _ in range(n)]
        if kind != "highest" or values.count(max(values)) == 1:
            break
    color, fs = rng.choice(list(COLORS)), rng.randint(14, 20)
    w, h = rng.randint(112, 256), rng.randint(128, 240)
    top, bottom = fs + 6, fs + 8              # room for the value labels above and the names below
    unit = (h - top - bottom - 4) // 9        # pixels per value unit, so the tallest bar (9) fits
    base = h - bottom                         # the axis line; bars stand on it
    slot = (w - 8) / n
    bar_w = max(8, int(slot * rng.uniform(0.45, 0.7)))
    image = Image.new("RGB", (w, h), WHITE)
    draw = ImageDraw.Draw(image)
    bars = []
    for i, v in enumerate(values):
        x0 = 4 + int(i * slot + (slot - bar_w) / 2)
        box = (x0, base - v * unit, x0 + bar_w - 1, base - 1)
        draw.rectangle(box, fill=COLORS[color])
        cx = (box[0] + box[2] + 1) / 2
        draw.text((cx, box[1] - 2), str(v), font=font(fs), fill=BLACK, anchor="mb")
        draw.text((cx, base + 3), labels[i], font=font(fs), fill=BLACK, anchor="mt")
        bars.append(list(box))
    draw.line((2, base, w - 3, base), fill=BLACK)
    named = dict(zip(labels, values))
    listing = ", ".join(f"{k} is {v}" for k, v in named.items())
    if kind == "value":
        bar = rng.choice(labels)
        answer, wrong = str(named[bar]), str(near(rng, named[bar], 1, 9))
        question, metric = f"What is the value of the {bar} bar?", "number"
        reasoning = [f"The {bar} bar reaches {answer}.", f"So the value of {bar} is {answer}."]
        slip = f"The {bar} bar reaches {wrong}."
        misled = [slip, f"So the value of {bar} is {wrong}."]
    elif kind == "highest":
        answer = labels[values.index(max(values))]
        wrong = max((k for k in labels if k != answer), key=named.get)  # the runner-up
        question, metric = "Which bar is highest?", "exact"
        reasoning = [f"{listing}.", f"The largest value is {max(values)}, on bar {answer}.",
                     f"So the highest bar is {answer}."]
        slip = f"The highest bar looks like {wrong}."
        misread = {**named, answer: named[wrong], wrong: named[answer]}  # the two tallest bars swapped
        misled = [", ".join(f"{k} is {v}" for k, v in misread.items()) + ".",
                  f"The largest value is {max(values)}, on bar {wrong}.", f"So the highest bar is {wrong}."]
    else:
        p, q = sorted(rng.sample(labels, 2))
        total = named[p] + named[q]
        answer, wrong = str(total), str(near(rng, total, 2, 18))
        question, metric = f"What is {p} plus {q}?", "number"
        reasoning = [f"{p} is {named[p]}.", f"{q} is {named[q]}.", f"{named[p]} + {named[q]} = {total}."]
        slip = f"{p} is {near(rng, named[p], 1, 9)}."
        off = int(wrong) - total  # one bar read one off, whichever stays in 1-9
        seen_p, seen_q = (named[p] + off, named[q]) if 1 <= named[p] + off <= 9 else (named[p], named[q] + off)
        misled = [f"{p} is {seen_p}.", f"{q} is {seen_q}.", f"{seen_p} + {seen_q} = {wrong}."]
    return Sample(
        "chart", [image], question, answer, metric, caption=f"a bar chart: {listing}",
        reasoning=reasoning, slip=slip, wrong=wrong, misled=misled,
        meta={"kind": kind, "labels": labels, "values": values, "color": color, "unit": unit, "base": base,
              "bars": bars, "font_size": fs})


def grounding(rng: random.Random) -> Sample:
    kinds = rng.sample(KINDS, rng.randint(2, 4))
    image, objs = scene(rng, kinds)
    target, other = objs[0], objs[1]
    box, other_box = target.rel_box(*image.size), other.rel_box(*image.size)

    def spans(b: tuple[float, ...]) -> list[str]:
        return [f"It spans x from {b[0]:.3f} to {b[2]:.3f}.", f"It spans y from {b[1]:.3f} to {b[3]:.3f}."]

    return Sample(
        "grounding", [image], f"Where is the <ref>{target.name}</ref>?", format_box(box), "iou",
        caption=scene_caption(objs, image.size), reasoning=[f"I find the {target.name}.", *spans(box)],
        slip=spans(other_box)[0], slip_at=1, wrong=format_box(other_box),
        misled=[f"I find the {target.name}.", *spans(other_box)],
        meta={"target": target.to_dict(), "box": list(box), "objects": [o.to_dict() for o in objs]})


def multi_image(rng: random.Random) -> Sample:
    shape = rng.choice(SHAPES)
    counts = rng.sample(range(1, 6), 2)
    images, colors, objects = [], [], []
    for n in counts:
        image, objs, color = counting(rng, shape, n)
        images.append(image)
        colors.append(color)
        objects.append([o.to_dict() for o in objs])
    answer = "first" if counts[0] > counts[1] else "second"
    a, b = counts
    misread = near(rng, a, 1, 6)
    wrong = "second" if answer == "first" else "first"
    # a misled trace misreads one count so that the comparison flips
    seen_a, seen_b = (b - 1, b) if answer == "first" and b > 1 else (a, a + 1) if answer == "first" else (b + 1, b)

    def trace(x: int, y: int) -> list[str]:  # x and y counted in the first and second image
        return [f"The first image has {x} {plural(shape, x)}.", f"The second image has {y} {plural(shape, y)}.",
                f"{max(x, y)} is more than {min(x, y)}, so the {'first' if x > y else 'second'} image has more."]

    return Sample(
        "multi_image", images, f"Which image has more {shape}s?", answer, "exact", reasoning=trace(a, b),
        slip=f"The first image has {misread} {plural(shape, misread)}.", recheck=RECOUNT,
        wrong=wrong, misled=trace(seen_a, seen_b),
        meta={"shape": shape, "counts": counts, "colors": colors, "objects": objects})


def video(rng: random.Random) -> Sample:
    direction, frames = rng.choice(DIRECTIONS), rng.randint(4, 6)
    size = rng.randint(80, 192), rng.randint(80, 192)
    axis = 0 if direction in ("left", "right") else 1
    side = max(12, round(rng.uniform(0.2, 0.28) * min(size)))
    color = rng.choice(list(COLORS))
    dist = round(rng.uniform(0.35, 0.55) * size[axis])
    start = rng.randint(3, size[axis] - side - 3 - dist)
    path = [start + round(dist * i / (frames - 1)) for i in range(frames)]
    if direction in ("left", "up"):
        path.reverse()
    across = rng.randint(3, size[1 - axis] - side - 3)
    balls = [Obj("circle", color, (p, across, p + side - 1, across + side - 1) if axis == 0 else
                 (across, p, across + side - 1, p + side - 1)) for p in path]
    swept = (min(b.box[0] for b in balls), min(b.box[1] for b in balls),
             max(b.box[2] for b in balls), max(b.box[3] for b in balls))
    still = []
    if rng.random() < 0.5:  # a static distractor, off the ball's path
        shape, other = rng.choice(("square", "triangle")), rng.choice([c for c in COLORS if c != color])
        still = place(rng, size, [(shape, other, side)], avoid=(swept,)) or []
    images = [render(size, still + [ball]) for ball in balls]
    coord = "xy"[axis]
    first, last = (round(balls[i].center[axis] / size[axis], 1) for i in (0, -1))

    def trace(start: float, end: float, moves: str) -> list[str]:
        return [f"In frame 1 the ball is at {coord} {start}.", f"In frame {frames} the ball is at {coord} {end}.",
                f"{coord} {'grows' if end > start else 'shrinks'}, so the ball moves {moves}."]

    return Sample(
        "video", images, "Which direction does the ball move?", direction, "exact", video=True,
        reasoning=trace(first, last, direction),
        slip=f"The ball seems to move {OPPOSITE[direction]}.", wrong=OPPOSITE[direction],
        misled=trace(last, first, OPPOSITE[direction]),  # the first and last places swapped
        meta={"direction": direction, "color": color, "balls": [b.box for b in balls],
              "still": [o.to_dict() for o in still]})


TASKS = {"count": count, "attribute": attribute, "spatial": spatial, "ocr": ocr, "chart": chart,
         "grounding": grounding, "multi_image": multi_image, "video": video}


PLACE_QUESTION = "Which part of the image is the {} in?"


def place_question(task: str, image: Image.Image, objs: list[Obj]) -> Sample:
    """Which part of `image` is its first object in? The second's place is the plausible wrong answer."""
    target = objs[0]
    return Sample(task, [image], PLACE_QUESTION.format(target.name), place_name(target, image.size), "exact",
                  caption=scene_caption(objs, image.size), wrong=place_name(objs[1], image.size),
                  meta={"target": target.to_dict(), "objects": [o.to_dict() for o in objs]})


def grid_place(rng: random.Random) -> Sample:
    """Where is the named object of a one-token grid (2-4 objects)? One of the four corners' place names."""
    return place_question("grid_place", *grid_scene(rng, rng.sample(KINDS, rng.randint(2, 4))))


def grid_spatial(rng: random.Random) -> Sample:
    """The spatial task on one-token grids."""
    return replace(spatial(rng, layout=grid_scene), task="grid_spatial")


# Warm-ups: the look-up a question about one named object needs, in its easiest form (each object alone in one
# visual token, a one- or two-word answer). Not tasks of the demo's world: the long preset trains them in phases
# of their own before P2, the route by which spatial relations left chance (DEMO.md, "Through the grids").
WARMUPS = {"grid_place": grid_place, "grid_spatial": grid_spatial}
CHART_KINDS = {"value": "read a bar", "highest": "highest bar", "sum": "add two bars"}


def question_category(sample: Sample) -> str:
    """What sets a question apart within its task (how many to count, how long a text, what a chart question
    asks), so that accuracy can be broken down by it: where along a task the model stops reaching a target."""
    m = sample.meta
    if sample.task == "count":
        return f"{m['count']} to count"
    if sample.task == "attribute":
        return f"asks the {m['asked']}"
    if sample.task == "ocr":
        return f"{m['kind']} of {len(m['text'])}"
    if sample.task == "chart":
        return CHART_KINDS[m["kind"]]
    if sample.task == "multi_image":
        return f"counts differ by {abs(m['counts'][0] - m['counts'][1])}"
    if sample.task == "video":
        return f"{len(m['balls'])} frames"
    return f"{len(m['objects'])} objects"  # spatial, grounding: how many to pick the named ones from


def thinking(sample: Sample, self_correct: bool = False) -> str:
    """The gpt value of a thinking-mode sample: a step-by-step trace, optionally with a slip that is caught
    and corrected, then the answer."""
    steps = list(sample.reasoning)
    if self_correct:
        steps[sample.slip_at:sample.slip_at] = [sample.slip, sample.recheck]
    return think_block(steps, sample.answer)


def misled_thinking(sample: Sample) -> str:
    """A plausible wrong thinking-mode response (the rejected side of a thinking-mode preference pair): a
    trace shaped like the right one that misreads the image and reasons consistently to the wrong answer,
    so that only the image tells the two apart."""
    return think_block(sample.misled, sample.wrong)


def unfaithful_thinking(sample: Sample) -> str:
    """A thinking-mode response whose answer contradicts its own trace: the right steps, then the wrong
    answer (the rejected side of a faithfulness pair; tiny models answer against their traces this way)."""
    return think_block(sample.reasoning, sample.wrong)


def think_block(steps: list[str], answer: str) -> str:
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n" + answer
