"""Region labels for vision pretraining agree with the rendered pixels, and the pretraining learns."""
import json
import random

import numpy as np
import pytest

from ovis25.processing import Processor
from ovis25.processing.image import preprocess_image
from ovis25.synth import build_world, write_model_dir
from ovis25.synth.pretrain import VisionPretrainConfig, labelled_images, pretrain_visual_tokenizer
from ovis25.synth.regions import CLASSES, class_maps, scene_objects, token_labels
from ovis25.synth.world import COLORS, TASKS, WHITE

SHAPE_TASKS = ("count", "attribute", "spatial", "grounding", "multi_image", "video")


def samples(task, n=12, seed="regions"):
    rng = random.Random(f"{seed}/{task}")
    return [TASKS[task](rng) for _ in range(n)]


@pytest.mark.parametrize("task", SHAPE_TASKS)
def test_shape_labels_are_the_drawn_pixels(task):
    """Shapes are drawn without antialiasing: the labelled pixels are exactly the coloured ones, in the
    labelled colour."""
    for sample in samples(task):
        for image, cmap in zip(sample.images, class_maps(sample)):
            pixels = np.asarray(image)
            assert cmap.shape == pixels.shape[:2]
            np.testing.assert_array_equal(cmap > 0, (pixels != WHITE).any(-1))
            for cls in np.unique(cmap[cmap > 0]):
                color = CLASSES[cls].split()[0]
                assert (pixels[cmap == cls] == COLORS[color]).all(), (task, CLASSES[cls])


def test_ocr_character_boxes_cover_the_ink_in_reading_order():
    for sample in samples("ocr", 20):
        cmap, pixels = class_maps(sample)[0], np.asarray(sample.images[0])
        ink = (pixels < 128).all(-1)
        assert ink.any() and (cmap[ink] > 0).all()  # every dark pixel lies in a character box
        text = sample.meta["text"]
        seen = [CLASSES[c].removeprefix("character ") for c in np.unique(cmap[cmap > 0])]
        assert sorted(set(text)) == sorted(seen)
        # the characters' boxes run left to right in the order of the string
        firsts = [np.nonzero((cmap == CLASSES.index(f"character {ch}")).any(0))[0].min() for ch in dict.fromkeys(text)]
        assert firsts == sorted(firsts)


def test_ocr_token_labels_spell_the_text_along_one_row():
    """Only glyph centres are labelled, on the line's row of tokens, so reading the labelled tokens in order
    gives the text, except where two narrow glyphs share a token."""
    spelled = 0
    for sample in samples("ocr", 60):
        labels = token_labels(sample, 4096, 25600)
        w = int(preprocess_image(sample.images[0], min_pixels=4096, max_pixels=25600)[1][0, 2]) // 2
        rows = {i // w for i in labels.nonzero().flatten().tolist()}
        read = "".join(CLASSES[c].removeprefix("character ") for c in labels.tolist() if c)
        assert len(rows) == 1 and read and set(read) <= set(sample.answer)
        spelled += read == sample.answer
        if sample.meta["kind"] == "number":  # digits are at least a token wide
            assert read == sample.answer
    assert spelled >= 0.9 * 60


def test_chart_labels_name_the_bars_and_their_values():
    for sample in samples("chart", 12):
        cmap, pixels = class_maps(sample)[0], np.asarray(sample.images[0])
        bar = CLASSES.index(f"{sample.meta['color']} bar")
        assert (pixels[cmap == bar] == COLORS[sample.meta["color"]]).all()
        for value, name in zip(sample.meta["values"], sample.meta["labels"]):
            for ch in (str(value), name):
                region = cmap == CLASSES.index(f"character {ch}")
                assert (pixels[region] < 128).all(-1).any(), ch  # the box holds the glyph's ink


@pytest.mark.parametrize("task", list(TASKS))
def test_one_label_per_visual_token_and_centres_marked(task):
    for sample in samples(task, 6):
        lo, hi = (1024, 9216) if sample.video else (4096, 16384) if len(sample.images) > 1 else (4096, 25600)
        labels = token_labels(sample, lo, hi)
        grids = [preprocess_image(im, min_pixels=lo, max_pixels=hi)[1] for im in sample.images]
        assert len(labels) == sum(int(g.prod()) // 4 for g in grids)
        assert 0 <= labels.min() and labels.max() < len(CLASSES)
        centres = {CLASSES[c] for c in labels.tolist() if CLASSES[c].endswith("centre")}
        wanted = {f"{o['color']} {o['shape']} centre" for objs in scene_objects(sample) for o in objs}
        assert centres == wanted


def test_centre_classes():
    import torch

    from ovis25.synth.regions import is_centre
    assert is_centre(torch.arange(len(CLASSES))).tolist() == [name.endswith(" centre") for name in CLASSES]


def test_vision_pretraining_lowers_the_loss(tmp_path):
    world = build_world(tmp_path / "world", seed=0, sizes="ci")
    assert world["samples"]["qa"] > 0
    init = write_model_dir(tmp_path / "init", tmp_path / "world" / "tokenizer", seed=0)
    cfg = VisionPretrainConfig(steps=40, batch_images=8, scenes_per_task=4, test_scenes_per_task=2)
    final = pretrain_visual_tokenizer(init, tmp_path / "p0v", seed=0, cfg=cfg, progress=False)
    losses = [json.loads(line)["loss_above_floor"]
              for line in (tmp_path / "p0v" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    accuracy = json.loads((tmp_path / "p0v" / "token_accuracy.json").read_text())
    assert set(accuracy) == set(TASKS) and all(0 <= a["objects"] <= 1 for a in accuracy.values())
    # centre tokens are scored where the images have objects, and only there
    assert 0 <= accuracy["count"]["centres"] <= 1 and accuracy["count"]["false_centres"] >= 0
    assert "centres" not in accuracy["ocr"]
    assert all(0 <= a["position_error"] <= 1 for a in accuracy.values())
    # only the visual tokenizer changed
    from ovis25 import Ovis
    before, after = Ovis.from_pretrained(init).state_dict(), Ovis.from_pretrained(final).state_dict()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.startswith("visual_tokenizer.") for k in changed)
    assert labelled_images(Processor.from_pretrained(final), cfg, 0, "test", 1)  # the geometry still matches


def test_position_words_say_where_each_token_is():
    """Column and row words split softly between the two nearest bins, so reading them back gives the
    token's place (clamped to the outer bin centres); every target is a distribution led by the class."""
    import torch

    from ovis25.synth.regions import (COLUMN_WORDS, POSITION_BINS, ROW_WORDS, read_positions, soft_bins,
                                      token_positions, token_targets)
    x = torch.rand(200)
    weights = soft_bins(x)
    assert torch.allclose(weights.sum(-1), torch.ones(200)) and (weights >= 0).all()
    assert ((weights > 0).sum(-1) <= 2).all()
    edge = 0.5 / POSITION_BINS
    assert torch.allclose(weights @ ((torch.arange(POSITION_BINS) + 0.5) / POSITION_BINS), x.clamp(edge, 1 - edge),
                          atol=1e-6)
    grids = torch.tensor([[1, 4, 6], [2, 2, 2]])  # a 2x3-token image, then two frames of one token
    pos = token_positions(grids)
    assert torch.allclose(pos, torch.tensor([[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75],
                                             [5 / 6, 0.75], [0.5, 0.5], [0.5, 0.5]]))
    labels = torch.tensor([0, 3, 5, 0, 1, 2, 7, 7])
    target = token_targets(labels, grids, 252, 0.2)
    assert torch.allclose(target.sum(-1), torch.ones(8))
    assert (target.argmax(-1) == labels).all() and target[:, COLUMN_WORDS].sum(-1).allclose(torch.full((8,), 0.2))
    assert target[:, ROW_WORDS].sum(-1).allclose(torch.full((8,), 0.2))
    assert torch.allclose(read_positions(target), pos.clamp(edge, 1 - edge), atol=1e-6)
    assert token_targets(labels, grids, 252, 0.0).equal(torch.nn.functional.one_hot(labels, 252).float())
