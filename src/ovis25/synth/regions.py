"""What each visual token of a synthetic image shows: dense region labels for vision pretraining.

The real Ovis2.5 starts from a SigLIP2 ViT that already sees shapes, colours and text. The demo's ViT starts
from random weights, and learning to see *through* the softmax visual tokenizer from captions alone is slow
and unstable at this size (DEMO.md). So before P1 the demo pretrains the visual tokenizer to
name the region under each visual token, using the generator's own scene description: background, the body
or the centre of a (colour, shape) object, a character, a bar, the axis. The head's existing softmax over
the visual vocabulary is the classifier, so after this phase each visual word means something and P1 only
has to learn its embedding. No question or answer is used.

A SigLIP2 token also knows where in the image it is. Class labels alone teach none of that (a linear probe
on the visual embeddings read a token's place no better than guessing the mean), so each target
distribution also puts some weight on words for the token's column and row (`token_targets`): the visual
embedding becomes what the token shows plus where it is.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..processing.image import smart_resize
from .world import COLORS, SHAPES, Obj, Sample, draw_obj, font

CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyzABCD"
CLASSES = (["background"] + [f"{c} {s}" for c in COLORS for s in SHAPES]
           + [f"{c} {s} centre" for c in COLORS for s in SHAPES]
           + [f"character {ch}" for ch in CHARACTERS] + [f"{c} bar" for c in COLORS] + ["axis"])
CLASS = {name: i for i, name in enumerate(CLASSES)}
CENTRES = range(1 + len(COLORS) * len(SHAPES), 1 + 2 * len(COLORS) * len(SHAPES))  # after background and bodies
# Where a token is: after the classes, POSITION_BINS visual words for its column and as many for its row,
# relative to the image (0 = left/top edge, 1 = right/bottom), softly split between the two nearest bins.
POSITION_BINS = 8
COLUMN_WORDS = range(len(CLASSES), len(CLASSES) + POSITION_BINS)
ROW_WORDS = range(COLUMN_WORDS.stop, COLUMN_WORDS.stop + POSITION_BINS)
MIN_SHARE = 1 / 16  # a token is labelled with a class covering at least this share of its region
# Characters are small: one outweighs the bar or axis it shares a token with.
PRIORITY = np.array([4 if name.startswith("character") else 1 for name in CLASSES])


def is_centre(classes: torch.Tensor) -> torch.Tensor:
    """Which of these class ids name an object's centre."""
    return (classes >= CENTRES.start) & (classes < CENTRES.stop)


def object_class(obj: dict, centre: bool = False) -> int:
    return CLASS[f"{obj['color']} {obj['shape']}" + (" centre" if centre else "")]


def scene_objects(sample: Sample) -> list[list[dict]]:
    """The objects drawn in each image of a shape sample (empty lists for text and charts)."""
    meta = sample.meta
    if sample.task == "multi_image":
        return meta["objects"]
    if sample.task == "video":
        still = meta["still"]
        return [still + [{"shape": "circle", "color": meta["color"], "box": list(b)}] for b in meta["balls"]]
    return [meta.get("objects", [])] * len(sample.images)


def character_boxes(meta: dict) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Each character of an OCR sample's text with the (x0, y0, x1, y1) box of its glyph, left to right."""
    face, text = font(meta["font_size"]), meta["text"]
    left, top = face.getbbox(text)[:2]
    x, y = meta["box"][0] - left, meta["box"][1] - top
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    return [(ch, draw.textbbox((x + face.getlength(text[:k]), y), ch, font=face)) for k, ch in enumerate(text)]


def class_maps(sample: Sample) -> list[np.ndarray]:
    """One (H, W) uint8 class map per image, drawn with the geometry the generator drew the pixels with."""
    maps = []
    for image, objects in zip(sample.images, scene_objects(sample)):
        canvas = Image.new("L", image.size, 0)
        draw = ImageDraw.Draw(canvas)
        for obj in objects:
            draw_obj(draw, Obj.from_dict(obj), fill=object_class(obj))
        if sample.task == "ocr":
            for ch, box in character_boxes(sample.meta):
                draw.rectangle(box, fill=CLASS[f"character {ch}"])
        elif sample.task == "chart":
            meta = sample.meta
            face, base = font(meta["font_size"]), meta["base"]
            draw.rectangle((2, base - 1, image.size[0] - 3, base + 1), fill=CLASS["axis"])
            for box, value, name in zip(meta["bars"], meta["values"], meta["labels"]):
                draw.rectangle(box, fill=CLASS[f"{meta['color']} bar"])
                cx = (box[0] + box[2] + 1) / 2
                draw.rectangle(draw.textbbox((cx, box[1] - 2), str(value), font=face, anchor="mb"),
                               fill=CLASS[f"character {value}"])
                draw.rectangle(draw.textbbox((cx, base + 3), name, font=face, anchor="mt"),
                               fill=CLASS[f"character {name}"])
        maps.append(np.asarray(canvas))
    return maps


def token_labels(sample: Sample, min_pixels: int, max_pixels: int, patch_size: int = 16,
                 hidden_stride: int = 2) -> torch.Tensor:
    """One class per visual token of every image (long, in the visual tokenizer's atom order: image, then
    token row-major), for the size the processor resizes the images to.

    A token takes the class covering most of its region, characters first (at least MIN_SHARE of it, else
    background); the token holding an object's centre takes that object's centre class, so counting is
    counting centres. OCR text is read the same way: only the token holding a glyph's centre (on the middle
    of the line, so a word's characters share one row of tokens) names that character, so reading is
    reading those tokens left to right; a token holding parts of two glyphs names neither."""
    cell = patch_size * hidden_stride
    out = []
    for image, cmap, objects in zip(sample.images, class_maps(sample), scene_objects(sample)):
        width, height = image.size
        h, w = smart_resize(height, width, cell, min_pixels, max_pixels)

        def token_at(x: float, y: float) -> int:
            row, col = min(int(y * h / height) // cell, h // cell - 1), min(int(x * w / width) // cell, w // cell - 1)
            return row * (w // cell) + col

        if sample.task == "ocr":
            labels = np.zeros((h // cell) * (w // cell), dtype=np.int64)
            middle = (sample.meta["box"][1] + sample.meta["box"][3]) / 2
            for ch, box in character_boxes(sample.meta):
                labels[token_at((box[0] + box[2]) / 2, middle)] = CLASS[f"character {ch}"]
            out.append(torch.from_numpy(labels))
            continue
        resized = np.asarray(Image.fromarray(cmap).resize((w, h), Image.Resampling.NEAREST))
        blocks = resized.reshape(h // cell, cell, w // cell, cell).transpose(0, 2, 1, 3).reshape(-1, cell * cell)
        counts = np.zeros((len(blocks), len(CLASSES)), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(len(blocks)), cell * cell), blocks.reshape(-1)), 1)
        counts[:, 0] = 0
        labels = np.where(counts.max(1) >= MIN_SHARE * cell * cell, (counts * PRIORITY).argmax(1), 0)
        for obj in objects:
            labels[token_at(*Obj.from_dict(obj).center)] = object_class(obj, centre=True)
        out.append(torch.from_numpy(labels))
    return torch.cat(out)


def soft_bins(x: torch.Tensor, bins: int = POSITION_BINS) -> torch.Tensor:
    """(n,) positions in [0, 1] -> (n, bins) weights on bin centres (k + 0.5) / bins, linear between the two
    nearest (so the weighted mean of the centres is x, clamped to the outer centres); bins >= 2."""
    at = (x * bins - 0.5).clamp(0, bins - 1)
    low = at.floor().long().clamp(max=bins - 2)
    frac = (at - low)[:, None]
    return torch.zeros(len(x), bins).scatter_(1, low[:, None], 1 - frac).scatter_(1, low[:, None] + 1, frac)


def token_positions(grid_thws: torch.Tensor, hidden_stride: int = 2) -> torch.Tensor:
    """(tokens, 2) relative (x, y) of every visual token's centre, in the tokenizer's atom order: image by
    image (each frame of a video in turn), tokens row-major."""
    out = []
    for t, h, w in grid_thws.tolist():
        rows, cols = h // hidden_stride, w // hidden_stride
        y, x = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
        out.append(torch.stack([x.reshape(-1), y.reshape(-1)], 1).repeat(t, 1))
    return torch.cat(out)


def read_positions(probs: torch.Tensor, bins: int = POSITION_BINS) -> torch.Tensor:
    """(tokens, vocab) visual-token distributions -> (tokens, 2) the (x, y) their column and row words say."""
    centres = (torch.arange(bins) + 0.5) / bins
    cols, rows = probs[:, COLUMN_WORDS], probs[:, ROW_WORDS]
    return torch.stack([words @ centres / words.sum(-1).clamp_min(1e-9) for words in (cols, rows)], 1)


def token_targets(labels: torch.Tensor, grid_thws: torch.Tensor, vocab: int, position_weight: float,
                  hidden_stride: int = 2) -> torch.Tensor:
    """(tokens, vocab) target distributions: the region class with weight 1 - 2 * position_weight, the column
    and row words with position_weight each, so a visual embedding is what the token shows plus where it is."""
    target = F.one_hot(labels, vocab).float() * (1 - 2 * position_weight)
    if position_weight:
        pos = token_positions(grid_thws, hidden_stride)
        target[:, COLUMN_WORDS] += position_weight * soft_bins(pos[:, 0])
        target[:, ROW_WORDS] += position_weight * soft_bins(pos[:, 1])
    return target
