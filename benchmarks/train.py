"""Training throughput: packed vs padded batches on the same samples, forward + backward + AdamW step.

Length mix (stated, roughly SFT-like): 40% text-only samples with log-normal lengths (median 180 tokens),
45% single-image samples (image 64..448 px per side at native aspect -> 4..196 visual tokens) with
short text, 15% two-image samples. Model: ViT 4 x 256 (patch 16), Qwen3 4 x 512 (8 q / 4 kv heads),
vocab 8192, random weights. Padded = batches of 8 samples right-padded to the longest; packed = first-fit
into rows of 2048 tokens. MFU = training FLOPs (6 x LLM layer params x real tokens + 6 x ViT params x patches, see
`ovis25.train.trainer.training_flops`) per second / measured fp32 matmul peak.
    python benchmarks/train.py [--quick]
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from common import table, write_results
from ovis25.config import OvisConfig, Qwen3Config, VisionConfig
from ovis25.model import Ovis
from ovis25.train.data import TrainSample
from ovis25.train.packing import collate_packed, collate_padded, pack_first_fit
from ovis25.train.trainer import measured_peak_flops, training_flops


def make_samples(n: int, seed: int = 0) -> list[TrainSample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        kind = rng.random()
        n_images = 0 if kind < 0.4 else 1 if kind < 0.85 else 2
        grids, visual = [], []
        for _ in range(n_images):
            h, w = (rng.randrange(2, 15) * 2 for _ in range(2))  # patches, even: 64..448 px
            grids.append([1, h, w])
            visual += [-301] + [-300] * (h * w // 4) + [-302]
        text_len = int(rng.lognormvariate(5.2, 0.6)) if n_images == 0 else rng.randrange(20, 120)
        text = [rng.randrange(8000) for _ in range(text_len)]
        ids = torch.tensor(visual + text)
        labels = ids.clone()
        labels[: len(visual) + text_len // 2] = -100  # the answer half is supervised
        pixels = torch.randn(sum(g[1] * g[2] for g in grids), 768) if grids else None
        samples.append(TrainSample(ids, labels, pixels, torch.tensor(grids) if grids else None))
    return samples


def step_fn(model: Ovis, opt: torch.optim.Optimizer, batch: dict) -> None:
    out = model(batch["input_ids"], batch["pixel_values"], batch["grid_thws"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"), targets=batch["targets"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(model: Ovis, batches: list[dict], real_tokens: int, patches: int, peak: float) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step_fn(model, opt, batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        step_fn(model, opt, b)
    dt = time.perf_counter() - t0
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"steps": len(batches), "seconds": dt, "real_tokens_per_s": real_tokens / dt,
            "padding_ratio": 1 - real_tokens / slots, "mfu": training_flops(model, real_tokens, patches) / dt / peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = OvisConfig(VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
                     Qwen3Config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=64), 2048)
    model = Ovis(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    samples = make_samples(48 if args.quick else 160)
    real = sum(len(s.input_ids) for s in samples)
    patches = sum(s.pixel_values.shape[0] for s in samples if s.pixel_values is not None)
    peak = measured_peak_flops(1.0)
    packs = pack_first_fit([len(s.input_ids) for s in samples], 2048)
    packed = [collate_packed([samples[i] for i in p]) for p in packs]
    padded = [collate_padded(samples[i:i + 8]) for i in range(0, len(samples), 8)]
    rows = []
    for name, batches in (("packed (first-fit, 2048/row)", packed), ("padded (8 per batch)", padded)):
        rows.append({"layout": name, **run(model, batches, real, patches, peak)})
        print(rows[-1], flush=True)
    rows[0]["speedup_vs_padded"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["speedup_vs_padded"] = 1.0
    print(f"samples {len(samples)}, real tokens {real}, params {n_params / 1e6:.1f}M, "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(table(rows, ["layout", "steps", "seconds", "real_tokens_per_s", "padding_ratio", "mfu", "speedup_vs_padded"]))
    write_results("train" + ("-quick" if args.quick else ""), rows,
                  {"samples": len(samples), "real_tokens": real, "params": n_params, "peak_flops": peak})


if __name__ == "__main__":
    main()
