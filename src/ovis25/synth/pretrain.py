"""Vision pretraining for the demo: teach the from-scratch visual tokenizer to name what it sees.

It stands in for the pretrained SigLIP2 a real Ovis2.5 starts from (see `regions`): every visual token is
classified, through the head's own softmax over the visual vocabulary, as the region under it (background,
a coloured shape's body or centre, a character, a bar). Images are fresh scenes from their own seeded
stream, so nothing here is drawn from the training or test splits on disk.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model import Ovis
from ..processing import Processor
from ..train.trainer import lr_lambda
from .build import task_rng
from .regions import CLASSES, is_centre, read_positions, token_labels, token_positions, token_targets
from .world import TASKS

log = logging.getLogger("ovis25.synth.pretrain")


@dataclass
class VisionPretrainConfig:
    # 1500 steps on 1500 scenes per task: held-out token accuracy on shapes 0.79-0.85 -> 0.90-0.94 (1000 steps
    # on 400 scenes); glyphs need the steps and a larger share of the images (below) to be learned at all.
    # 3000 steps read better still (shapes 0.94-0.97, glyphs 0.78-0.86) and raise counting and OCR a little, but
    # in two seeds not the demo's mean (video fell), for about twice the time (DEMO.md, "What changed")
    steps: int = 1500
    batch_images: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    scenes_per_task: int = 1500
    test_scenes_per_task: int = 20
    # (min_pixels, max_pixels) per kind of sample, as the recipes' data budgets
    single: tuple[int, int] = (64 * 64, 160 * 160)
    multiple: tuple[int, int] = (64 * 64, 128 * 128)
    video: tuple[int, int] = (32 * 32, 96 * 96)
    # the share of each target distribution on the token's column word and again on its row word
    position_weight: float = 0.2
    # how often each task's images are drawn relative to the others (1 when not named): an OCR image holds a
    # few glyph tokens of 36 kinds (held-out glyph accuracy 0.11 at weight 1, 0.77 at 3)
    task_weights: dict[str, float] = field(default_factory=lambda: {"ocr": 3.0})


@dataclass
class Item:
    task: str
    pixel_values: torch.Tensor  # (patches, C*ps*ps)
    grid_thw: torch.Tensor      # (1, 3)
    labels: torch.Tensor        # (tokens,)


def labelled_images(processor: Processor, cfg: VisionPretrainConfig, seed: int, split: str,
                    per_task: int) -> list[Item]:
    """`per_task` fresh scenes of every task, cut into images with one class per visual token."""
    items = []
    for task, draw in TASKS.items():
        rng = task_rng(seed, f"vision-{split}", task)
        for _ in range(per_task):
            sample = draw(rng)
            lo, hi = cfg.video if sample.video else cfg.multiple if len(sample.images) > 1 else cfg.single
            labels = token_labels(sample, lo, hi, processor.patch_size, processor.hidden_stride)
            start = 0
            for image in sample.images:
                pixel_values, grid = processor.preprocess_image(image, min_pixels=lo, max_pixels=hi)
                n = int(grid.prod()) // processor.hidden_stride ** 2
                items.append(Item(task, pixel_values, grid, labels[start:start + n]))
                start += n
    return items


def collate(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.cat([i.pixel_values for i in items]), torch.cat([i.grid_thw for i in items]),
            torch.cat([i.labels for i in items]))


@torch.no_grad()
def token_accuracy(model: Ovis, items: list[Item]) -> dict[str, dict[str, float]]:
    """Per task: class accuracy over all visual tokens and over the tokens that show something, and the mean
    distance (in image widths / heights) between where the position words put a token and where it is."""
    vt = model.visual_tokenizer.eval()
    out = {}
    for task in TASKS:
        pixel_values, grids, labels = collate([i for i in items if i.task == task])
        logits = vt.head_logits(vt.vit(pixel_values, grids))
        pred, shown, centres = logits[:, :len(CLASSES)].argmax(-1), labels > 0, is_centre(labels)
        error = (read_positions(logits.softmax(-1)) - token_positions(grids, vt.config.hidden_stride)).abs().mean()
        out[task] = {"tokens": round((pred == labels).float().mean().item(), 4),
                     "objects": round((pred[shown] == labels[shown]).float().mean().item(), 4),
                     "position_error": round(error.item(), 4)}
        if centres.any():  # images with objects: are their centres found, and named where there are none?
            out[task]["centres"] = round((pred[centres] == labels[centres]).float().mean().item(), 4)
            out[task]["false_centres"] = int((is_centre(pred) & (pred != labels)).sum())
    vt.train()
    return out


def pretrain_visual_tokenizer(init: str | Path, out_dir: str | Path, seed: int = 0,
                              cfg: VisionPretrainConfig | None = None, progress: bool = True) -> Path:
    """Train the ViT and head of the checkpoint `init` on region labels; writes `out_dir/final` (official
    format, every other weight unchanged), `out_dir/metrics.jsonl` and `out_dir/token_accuracy.json`."""
    cfg = cfg or VisionPretrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, processor = Ovis.from_pretrained(init), Processor.from_pretrained(init)
    generation_config = json.loads((Path(init) / "generation_config.json").read_text())
    train = labelled_images(processor, cfg, seed, "train", cfg.scenes_per_task)
    test = labelled_images(processor, cfg, seed, "test", cfg.test_scenes_per_task)
    by_task: dict[str, list[Item]] = {}
    for item in train:
        by_task.setdefault(item.task, []).append(item)
    task_names = list(by_task)
    task_weights = [cfg.task_weights.get(t, 1.0) for t in task_names]
    vt = model.visual_tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in vt.named_parameters() if "post_layernorm" not in n]  # unused by the tokenizer
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    rng = random.Random(seed)
    metrics = (out / "metrics.jsonl").open("w")
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="p0v vision", unit="step", disable=not progress)
    for step in bar:
        scale = lr_lambda(step - 1, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * scale
        # tasks are drawn by weight, not by image count, so the many frames of a video do not crowd out text
        tasks = rng.choices(task_names, weights=task_weights, k=cfg.batch_images)
        pixel_values, grids, labels = collate([rng.choice(by_task[t]) for t in tasks])
        logits = vt.head_logits(vt.vit(pixel_values, grids))
        target = token_targets(labels, grids, logits.shape[-1], cfg.position_weight, processor.hidden_stride)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # the loss cannot fall below the targets' own entropy: what is left above it is what can be learned
        floor = torch.special.entr(target).sum(-1).mean()
        metrics.write(json.dumps({"step": step, "loss": loss.item(), "loss_above_floor": (loss - floor).item(),
                                  "lr": cfg.lr * scale, "grad_norm": grad_norm.item()}) + "\n")
        bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics.close()
    accuracy = token_accuracy(model, test)
    (out / "token_accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    log.info("vision pretraining: %d steps in %.0f s; held-out token accuracy (objects) %s", cfg.steps,
             time.perf_counter() - t0, {t: a["objects"] for t, a in accuracy.items()})
    model.save_pretrained(out / "final", processor=processor, generation_config=generation_config)
    return out / "final"
