"""The frozen-ViT cache: the same features as the ViT, each image through the ViT once, never while it trains."""
import json
import logging

import pytest
import torch
from PIL import Image

from conftest import requires_fixtures
from ovis25 import Ovis, Processor
from ovis25.train import load_recipe, train
from ovis25.train.vision_cache import FrozenVisionCache
from test_train import TINY_BUDGET, make_dataset, tiny_model_dir

pytestmark = requires_fixtures


def media(proc: Processor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three images of different sizes, a three-frame clip and a fourth image of the first's size, as (pixel rows,
    grid)."""
    g = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
                for w, h in [(40, 30), (64, 64), (30, 90), (48, 32), (48, 32), (48, 32), (40, 30)]]
    items = [proc.preprocess_image(p, min_pixels=1024, max_pixels=4096) for p in pictures[:3]]
    return items + [proc.preprocess_video(pictures[3:6], min_pixels=1024, max_pixels=2048),
                    proc.preprocess_image(pictures[6], min_pixels=1024, max_pixels=4096)]


def pack(items):
    return torch.cat([pv for pv, _ in items]), torch.cat([grid for _, grid in items])


def frozen_vit():
    model = Ovis.from_pretrained(tiny_model_dir())
    model.requires_grad_(False)
    runs = []  # pixel rows of every ViT call
    model.visual_tokenizer.vit.register_forward_pre_hook(lambda _, args: runs.append(args[0].shape[0]))
    return model, runs


def test_cached_features_equal_the_vits_and_each_image_runs_once():
    model, runs = frozen_vit()
    vit = model.visual_tokenizer.vit
    items = media(Processor.from_pretrained(tiny_model_dir()))
    cache = FrozenVisionCache(max_bytes=2**30)
    # the first image twice in one call, then all of them again in another order
    first, second = [items[0], items[1], items[0], items[3]], [items[3], items[2], items[0], items[4], items[1]]
    for batch in (first, second):
        pixels, grids = pack(batch)
        with torch.no_grad():
            expected = vit(pixels, grids)
        runs.clear()
        torch.testing.assert_close(cache(vit, pixels, grids), expected, rtol=1e-5, atol=1e-5)
        if batch is first:  # the repeat is computed once
            assert runs == [sum(int(g.prod()) for _, g in [items[0], items[1], items[3]])]
        else:  # only the images not seen before (one the size of a cached one)
            assert runs == [int(items[2][1].prod()) + int(items[4][1].prod())]
    assert (cache.hits, cache.misses, len(cache.entries)) == (4, 5, 5)
    pixels, grids = pack(second)
    runs.clear()
    cache(vit, pixels, grids)
    assert runs == [] and cache.hits == 9
    # the visual tokenizer uses the cache when one is set, and gives what it gives without
    vt = model.visual_tokenizer
    with torch.no_grad():
        plain = vt(pixels, grids)
        vt.feature_cache = cache
        torch.testing.assert_close(vt(pixels, grids), plain, rtol=1e-5, atol=1e-6)


def test_cache_is_bypassed_while_the_vit_trains():
    model, runs = frozen_vit()
    vit = model.visual_tokenizer.vit
    pixels, grids = pack(media(Processor.from_pretrained(tiny_model_dir())))
    cache = FrozenVisionCache(max_bytes=2**30)
    cache(vit, pixels, grids)
    vit.vision_model.encoder.layers[-1].requires_grad_(True)
    runs.clear()
    out = cache(vit, pixels, grids)
    out.sum().backward()  # the ViT ran with autograd: its trainable block gets a gradient
    assert runs == [pixels.shape[0]]
    assert vit.vision_model.encoder.layers[-1].mlp.fc1.weight.grad is not None


def test_cache_stops_storing_at_its_limit():
    model, runs = frozen_vit()
    vit = model.visual_tokenizer.vit
    items = media(Processor.from_pretrained(tiny_model_dir()))
    one = int(items[0][1].prod()) * vit.config.hidden_size * 4  # bytes of the first image's features
    cache = FrozenVisionCache(max_bytes=one)
    pixels, grids = pack(items)
    with torch.no_grad():
        expected = vit(pixels, grids)
    for _ in range(2):
        torch.testing.assert_close(cache(vit, pixels, grids), expected, rtol=1e-5, atol=1e-5)
    assert len(cache.entries) == 1 and cache.bytes == one
    assert runs[-1] == pixels.shape[0] - int(items[0][1].prod())  # the rest is computed every time


def run_losses(tmp_path, name: str, extra: list[str]) -> tuple[list[float], dict]:
    out = tmp_path / name
    datainfo = tmp_path / "data" / "datainfo.json"
    cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{out}"', f'datainfo="{datainfo}"',
                             "max_tokens=256", "epochs=2", "lr=1e-3", "progress=false",
                             'train_modules="llm|vte|visual_tokenizer.head"', *TINY_BUDGET, *extra])
    final = train(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, Ovis.from_pretrained(final).state_dict()


def test_training_with_a_frozen_vit_is_the_same_with_and_without_the_cache(tmp_path, caplog):
    make_dataset(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="ovis25.train"):
        cached, cached_weights = run_losses(tmp_path, "cached", [])
    served = [r.getMessage() for r in caplog.records if "frozen-ViT cache" in r.getMessage()]
    assert served and not served[0].startswith("0/"), served  # the second epoch's images came from memory
    plain, plain_weights = run_losses(tmp_path, "plain", ["vision_cache_mb=0"])
    assert len(cached) == len(plain) >= 4
    for a, b in zip(cached, plain):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (cached, plain)
    for name, w in plain_weights.items():
        torch.testing.assert_close(cached_weights[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_negative_cache_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vision_cache_mb"):
        load_recipe(None, [f'init="{tiny_model_dir()}"', "vision_cache_mb=-1"]).validate()
