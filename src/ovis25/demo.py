"""`make demo`: run the whole inference path on a checkpoint directory and say what happened.

Until the synthetic-world curriculum lands, the default checkpoint is a tiny *random-weight* model from
the golden fixtures (official on-disk format), so the answers are gibberish by construction: the demo
shows the machinery (preprocessing, visual tokenizer, prompt, forward, thinking-budget generation).
    python -m ovis25.demo [MODEL_DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import ovis25

DEFAULT_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


def sample_image() -> Image.Image:
    """A 320x200 picture with a few shapes: a native, non-square resolution."""
    img = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 30, 110, 120), fill="red")
    draw.ellipse((150, 50, 230, 130), fill="blue")
    draw.polygon([(260, 170), (300, 100), (310, 175)], fill="green")
    return img


def default_model_dir() -> Path:
    root = Path(os.environ.get("OVIS25_FIXTURES", DEFAULT_FIXTURES))
    candidates = sorted((root / "models").glob("*/config.json"))
    if not candidates:
        sys.exit(f"No checkpoint given and no fixture models under {root}/models. "
                 "Pass a checkpoint directory: python -m ovis25.demo MODEL_DIR")
    return candidates[0].parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", type=Path)
    args = ap.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    print(f"== ovis25 demo on {model_dir}")
    if args.model_dir is None:
        print("   (a tiny checkpoint with RANDOM weights: the text it produces is meaningless by design)")

    t0 = time.perf_counter()
    model = ovis25.Ovis.from_pretrained(model_dir, dtype=torch.float32)
    proc = ovis25.Processor.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    vc, lc = model.config.vit_config, model.config.llm_config
    print(f"1. loaded in {time.perf_counter() - t0:.2f}s: {n_params:,} parameters; ViT {vc.num_hidden_layers} blocks "
          f"x {vc.hidden_size}, Qwen3 {lc.num_hidden_layers} layers x {lc.hidden_size}, "
          f"visual vocab {model.config.visual_vocab_size}")

    image = sample_image()
    budget = dict(min_pixels=64 * 64, max_pixels=256 * 256)
    pixel_values, grid = proc.preprocess_image(image, **budget)
    t, h, w = grid[0].tolist()
    print(f"2. image {image.width}x{image.height} -> resized to {w * vc.patch_size}x{h * vc.patch_size} px "
          f"(budget {budget}), grid (t,h,w)={t, h, w}: {pixel_values.shape[0]} patches of {pixel_values.shape[1]} "
          f"values -> {model.num_visual_atoms(grid)} visual tokens")

    with torch.no_grad():
        probs = model.visual_tokenizer(pixel_values, grid)
    top = probs.max(-1)
    print(f"3. visual tokenizer: probabilities {tuple(probs.shape)}, rows sum to "
          f"{probs.sum(-1).mean():.4f}; mean top-1 probability {top.values.mean():.3f}")

    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What shapes do you see?"}]}]
    print("4. prompt rendered with the checkpoint's chat template:")
    print("   " + proc.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
          .replace("\n", "\n   "))
    batch = proc(messages, enable_thinking=False, **budget)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["grid_thws"])
    ids = batch["input_ids"][0]
    print(f"5. forward: {ids.numel()} positions ({int((ids == -300).sum())} visual) -> logits {tuple(out.logits.shape)}")

    chat = ovis25.Chat(model, proc)
    for think, budget_tokens in ((False, None), (True, 4)):
        t0 = time.perf_counter()
        res = chat.generate(messages, enable_thinking=think, thinking_budget=budget_tokens, max_new_tokens=24,
                            **budget)
        dt = time.perf_counter() - t0
        label = f"thinking on, budget {budget_tokens}" if think else "thinking off"
        print(f"6. generate ({label}): {len(res.token_ids)} tokens in {dt:.2f}s, finish={res.finish_reason}")
        if think:
            print(f"   thinking: {res.thinking!r}")
        print(f"   answer:   {res.text!r}")
    print("Done. Random weights give random words; train or load a released checkpoint for real answers.")


if __name__ == "__main__":
    main()
