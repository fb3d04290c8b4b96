"""Every generated answer is re-derived from the pixels alone (plus the question text), never trusted."""
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ovis25.grounding import Box, parse_boxes
from ovis25.synth.world import COLORS, TASKS, WARMUPS, font, misled_thinking, thinking, unfaithful_thinking

N = 40  # samples per task


def components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """4-connected components of a boolean mask: (x0, y0, x1, y1, pixels) each, flood fill in pure Python."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, xs, ys = [(y, x)], [], []
        while stack:
            cy, cx = stack.pop()
            xs.append(cx)
            ys.append(cy)
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append((min(xs), min(ys), max(xs), max(ys), len(xs)))
    return out


def objects(image: Image.Image) -> list[dict]:
    """Every coloured blob, its shape told by how much of its bounding box it fills."""
    pixels = np.asarray(image)
    found = []
    for color, rgb in COLORS.items():
        for x0, y0, x1, y1, n in components((pixels == rgb).all(-1)):
            fill = n / ((x1 - x0 + 1) * (y1 - y0 + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            found.append({"color": color, "shape": shape, "box": (x0, y0, x1, y1), "pixels": n,
                          "center": ((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2)})
    return found


def the(objs: list[dict], **want) -> dict:
    hits = [o for o in objs if all(o[k] == v for k, v in want.items())]
    assert len(hits) == 1, (want, objs)
    return hits[0]


def shape_in(question: str) -> str:
    return re.search(r"(circle|square|triangle)s?\b", question).group(1)


def check_count(s):
    found = objects(s.images[0])
    assert all(o["pixels"] >= 60 for o in found)  # every object is big enough to see
    assert str(sum(o["shape"] == shape_in(s.question) for o in found)) == s.answer


def check_attribute(s):
    found = objects(s.images[0])
    m = re.fullmatch(r"What color is the (\w+)\?", s.question)
    if m:
        assert the(found, shape=m.group(1))["color"] == s.answer
    else:
        color = re.fullmatch(r"What shape is the (\w+) object\?", s.question).group(1)
        assert the(found, color=color)["shape"] == s.answer


def check_spatial(s):
    m = re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", s.question)
    ca, sa, rel, cb, sb = m.groups()
    found = objects(s.images[0])
    a, b = the(found, color=ca, shape=sa)["center"], the(found, color=cb, shape=sb)["center"]
    holds = {"left of": a[0] < b[0], "right of": a[0] > b[0], "above": a[1] < b[1], "below": a[1] > b[1]}[rel]
    assert s.answer == ("yes" if holds else "no")


def check_grounding(s):
    color, shape = re.fullmatch(r"Where is the <ref>(\w+) (\w+)</ref>\?", s.question).groups()
    x0, y0, x1, y1 = the(objects(s.images[0]), color=color, shape=shape)["box"]
    w, h = s.images[0].size
    (box,) = parse_boxes(s.answer)
    assert box.iou(Box(x0 / w, y0 / h, (x1 + 1) / w, (y1 + 1) / h)) >= 0.9


def check_multi_image(s):
    shape = shape_in(s.question)
    a, b = (sum(o["shape"] == shape for o in objects(im)) for im in s.images)
    assert a != b and s.answer == ("first" if a > b else "second")


def check_video(s):
    assert 4 <= len(s.images) <= 6 and len({im.size for im in s.images}) == 1
    xs, ys = zip(*(the(objects(im), shape="circle")["center"] for im in s.images))
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    assert s.answer == moved
    steps = np.diff(xs if moved in ("left", "right") else ys)
    assert (steps > 0).all() or (steps < 0).all()  # monotonic, not just net motion


def check_chart(s):
    meta = s.meta
    pixels = np.asarray(s.images[0])
    bars = sorted(components((pixels == COLORS[meta["color"]]).all(-1)))
    assert len(bars) == len(meta["labels"])
    heights = [y1 - y0 + 1 for _, y0, _, y1, _ in bars]
    assert all(b[3] == meta["base"] - 1 for b in bars)  # all stand on the axis
    assert all(hgt % meta["unit"] == 0 for hgt in heights)
    values = dict(zip(meta["labels"], (hgt // meta["unit"] for hgt in heights)))  # read off the pixels
    if m := re.fullmatch(r"What is the value of the (\w) bar\?", s.question):
        assert s.answer == str(values[m.group(1)])
    elif m := re.fullmatch(r"What is (\w) plus (\w)\?", s.question):
        assert s.answer == str(values[m.group(1)] + values[m.group(2)])
    else:
        assert s.question == "Which bar is highest?"
        assert sorted(values.values())[-1] > sorted(values.values())[-2]
        assert s.answer == max(values, key=values.get)


def check_ocr(s):
    meta, image = s.meta, s.images[0]
    assert s.answer == meta["text"] and s.question == f"What {meta['kind']} is written?"
    x0, y0, x1, y1 = meta["box"]
    again = Image.new("RGB", image.size, "white")  # the answer text, drawn afresh, gives the same pixels
    left, top, _, _ = font(meta["font_size"]).getbbox(s.answer)
    ImageDraw.Draw(again).text((x0 - left, y0 - top), s.answer, font=font(meta["font_size"]), fill="black")
    assert np.array_equal(np.asarray(again), np.asarray(image))
    ink = np.argwhere(np.asarray(image.convert("L")) < 128)
    assert len(ink) and ink[:, 1].min() >= x0 - 2 and ink[:, 1].max() <= x1 + 2 \
        and ink[:, 0].min() >= y0 - 2 and ink[:, 0].max() <= y1 + 2


def check_grid(s) -> list[dict]:
    """A one-token grid: 64 x 64, each object inside a 32 x 32 quadrant of its own -> the objects."""
    found = objects(s.images[0])
    quadrants = [(o["box"][0] // 32, o["box"][1] // 32) for o in found]
    assert s.images[0].size == (64, 64) and 2 <= len(found) <= 4 and len(set(quadrants)) == len(found)
    assert all((o["box"][2] // 32, o["box"][3] // 32) == q for o, q in zip(found, quadrants))
    return found


def check_grid_place(s):
    color, shape = re.fullmatch(r"Which part of the image is the (\w+) (\w+) in\?", s.question).groups()
    x, y = the(check_grid(s), color=color, shape=shape)["center"]
    assert s.answer == f"{'top' if y < 32 else 'bottom'} {'left' if x < 32 else 'right'}"


def check_grid_spatial(s):
    check_grid(s)
    check_spatial(s)


CHECKS = {"count": check_count, "attribute": check_attribute, "spatial": check_spatial, "ocr": check_ocr,
          "chart": check_chart, "grounding": check_grounding, "multi_image": check_multi_image,
          "video": check_video, "grid_place": check_grid_place, "grid_spatial": check_grid_spatial}


def test_every_task_has_a_check():
    assert set(CHECKS) == set(TASKS) | set(WARMUPS)


@pytest.mark.parametrize("task", [*TASKS, *WARMUPS])
def test_answers_match_pixels(task):
    rng = random.Random(f"check/{task}")
    answers = set()
    for _ in range(N):
        s = {**TASKS, **WARMUPS}[task](rng)
        assert s.task == task
        CHECKS[task](s)
        answers.add(s.answer)
        assert all(64 <= side <= 256 for im in s.images for side in im.size)
        assert s.wrong and s.wrong != s.answer and s.metric in ("exact", "number", "iou")
    if task not in ("grounding", "ocr"):
        assert len(answers) >= 2  # not a constant answer


def test_images_have_varied_sizes():
    rng = random.Random("sizes")
    sizes = {TASKS["count"](rng).images[0].size for _ in range(20)}
    assert len(sizes) == 20 and len({w > h for w, h in sizes}) == 2


@pytest.mark.parametrize("task", list(TASKS))
def test_thinking_trace(task):
    s = TASKS[task](random.Random(task))
    plain, fixed = thinking(s), thinking(s, self_correct=True)
    for text in (plain, fixed):
        assert text.startswith("<think>\n") and text.endswith("\n</think>\n\n" + s.answer)
        assert text.count("</think>") == 1
    assert s.slip in fixed and s.recheck in fixed and s.slip not in plain
    assert fixed.index(s.slip) < fixed.index(s.recheck)
    misled = misled_thinking(s)
    assert misled.startswith("<think>\n") and misled.endswith("\n</think>\n\n" + s.wrong) and s.wrong != s.answer
    assert len(s.misled) == len(s.reasoning) and s.misled != s.reasoning  # shaped like the right trace
    unfaithful = unfaithful_thinking(s)  # the right trace word for word, then the wrong answer
    assert unfaithful == plain[:-len(s.answer)] + s.wrong


def consistent(steps: list[str]) -> bool:
    """The arithmetic and comparisons a trace states hold."""
    for step in steps:
        for x, y, z in re.findall(r"(\d+) \+ (\d+) = (\d+)", step):
            if int(x) + int(y) != int(z):
                return False
        for x, rel, y in re.findall(r"([\d.]+) is (less|more) than ([\d.]+)", step):
            if (float(x) < float(y)) != (rel == "less") or float(x) == float(y):
                return False
    return True


@pytest.mark.parametrize("task", list(TASKS))
def test_misled_trace_reasons_consistently_to_the_wrong_answer(task):
    rng = random.Random(f"misled-{task}")
    for _ in range(40):
        s = TASKS[task](rng)
        assert consistent(s.reasoning) and consistent(s.misled), (s.reasoning, s.misled)
        if task == "grounding":  # the spans are the wrong box's
            x0, y0, x1, y1 = (float(v) for v in re.findall(r"[\d.]+", s.wrong))
            assert s.misled[1:] == [f"It spans x from {x0:.3f} to {x1:.3f}.", f"It spans y from {y0:.3f} to {y1:.3f}."]
        else:
            assert re.search(rf"\b{re.escape(s.wrong)}\b", s.misled[-1]), (s.misled, s.wrong)


def test_same_stream_same_samples():
    a, b = TASKS["chart"](random.Random(3)), TASKS["chart"](random.Random(3))
    assert a.answer == b.answer and a.images[0].tobytes() == b.images[0].tobytes()


@pytest.mark.parametrize("task", ["count", "attribute", "spatial", "grounding"])
def test_captions_say_what_and_where_as_the_pixels_do(task):
    """A scene caption lists every object with the third of the image its centre lies in; each listed
    object is a blob of that colour and shape found in the pixels, centred in that third."""
    rng = random.Random(f"caption/{task}")
    for _ in range(N):
        s = TASKS[task](rng)
        image = s.images[0]
        what, where = s.caption.split(": ")
        listed = re.findall(r"a (\w+) (circle|square|triangle) at the ([a-z ]+?)(?:,|$)", where)
        blobs = objects(image)
        assert what and sorted((c, sh) for c, sh, _ in listed) == sorted((o["color"], o["shape"]) for o in blobs)
        for color, shape, place in listed:
            words = place.split()
            want_row = 0 if "top" in words else 2 if "bottom" in words else 1
            want_col = 0 if "left" in words else 2 if "right" in words else 1
            assert any(o["color"] == color and o["shape"] == shape
                       and min(2, int(3 * o["center"][0] / image.width)) == want_col
                       and min(2, int(3 * o["center"][1] / image.height)) == want_row for o in blobs), (s.caption,)
