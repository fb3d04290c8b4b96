"""Training throughput on the same samples: packed vs padded batches, activation checkpointing on/off,
bfloat16 autocast on/off, torch.compile on/off (full run only: compiling takes minutes here); forward + backward
+ AdamW step on CPU, float32 unless autocast.

Length mix (stated, roughly SFT-like): 40% text-only samples with log-normal lengths (median 180 tokens),
45% single-image samples (64..448 px per side at native aspect -> 4..196 visual tokens) with short text, 15%
two-image samples; half of each sample's text is supervised. Model: ViT 4 x 256 (patch 16), Qwen3 4 x 512
(8 q / 4 kv heads), vocab 8192, random weights. Padded = batches of 8 samples right-padded to the longest;
packed = first-fit into rows of 2048 tokens. Checkpointing and compilation are applied per transformer block
by the trainer's own `parallelize` (compile: `block.compile(dynamic=True)`), on the packed layout; the
compiled run is timed on a few steps after a first step that includes the compilation.
MFU = training FLOPs (6 x LLM layer params x real tokens + 6 x ViT params x patches, see
`ovis25.train.trainer.training_flops`) per second / the float32 matmul peak measured in the same run.
"""
from __future__ import annotations

import random
import time

import torch

from common import PeakMemory, pick, table, verdict
from ovis25.config import OvisConfig, Qwen3Config, VisionConfig
from ovis25.model import Ovis
from ovis25.train.config import TrainConfig
from ovis25.train.data import TrainSample
from ovis25.train.packing import collate_packed, collate_padded, pack_first_fit
from ovis25.train.precision import autocast
from ovis25.train.trainer import parallelize, training_flops


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


def model_config(mode: str) -> OvisConfig:
    if mode == "smoke":
        return OvisConfig(VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
                          Qwen3Config(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32), 256)
    return OvisConfig(VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
                      Qwen3Config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=64), 2048)


def step_fn(model: Ovis, opt: torch.optim.Optimizer, batch: dict, dtype: torch.dtype | None = None) -> None:
    with autocast(dtype, torch.device("cpu")):
        out = model(batch["input_ids"], batch["pixel_values"], batch["grid_thws"],
                    attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                    cu_seqlens=batch.get("cu_seqlens"), targets=batch["targets"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_run(cfg: OvisConfig, batches: list[dict], peak: float, checkpointing: bool = False, compile: bool = False,
              dtype: torch.dtype | None = None) -> dict:
    """A fresh model (same seed), one warm-up step (which compiles, when compiling), then `batches` timed."""
    torch.manual_seed(0)
    model = parallelize(Ovis(cfg).train(), TrainConfig(activation_checkpointing=checkpointing, compile=compile),
                        1, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        step_fn(model, opt, batches[0], dtype)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            step_fn(model, opt, b, dtype)
        dt = time.perf_counter() - t0
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["cu_seqlens"][-1]) for b in batches)
    patches = sum(0 if b["pixel_values"] is None else b["pixel_values"].shape[0] for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"steps": len(batches), "seconds": dt, "first_step_s": first, "real_tokens_per_s": real / dt,
            "padding": 1 - real / slots, "mfu": training_flops(model, real, patches) / dt / peak, **mem.columns()}


def run(mode: str, limits: dict | None = None) -> dict:
    from machine import matmul_flops
    peak = (limits or {}).get("peak_flops_fp32") or matmul_flops(torch.float32, 1024, 1.0)
    cfg = model_config(mode)
    samples = make_samples(pick(mode, 160, 48, 4))
    packed = [collate_packed([samples[i] for i in p]) for p in pack_first_fit([len(s.input_ids) for s in samples], 2048)]
    padded = [collate_padded(samples[i:i + 8]) for i in range(0, len(samples), 8)]
    few = packed[:pick(mode, 4, 2, 1)]  # checkpointing and compile: measured on a few steps
    rows = [{"layout": "packed (first-fit, 2048/row)", **train_run(cfg, packed, peak)},
            {"layout": "padded (8 per batch)", **train_run(cfg, padded, peak)},
            {"layout": f"packed, first {len(few)} rows", **train_run(cfg, few, peak)},
            {"layout": f"packed, first {len(few)} rows, activation checkpointing",
             **train_run(cfg, few, peak, checkpointing=True)},
            {"layout": f"packed, first {len(few)} rows, bfloat16 autocast (decoder layers)",
             **train_run(cfg, few, peak, dtype=torch.bfloat16)}]
    if mode == "full":  # compiling forward and backward takes minutes on this CPU: measured once, in the full run
        rows.append({"layout": f"packed, first {len(few)} rows, torch.compile",
                     **train_run(cfg, few, peak, compile=True)})
    rows[0]["speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["speedup"] = 1.0
    for r in rows[2:]:
        r["speedup"] = rows[2]["seconds"] / r["seconds"]
    params = sum(p.numel() for p in Ovis(cfg).parameters())
    return {"config": {"samples": len(samples), "real_tokens": sum(len(s.input_ids) for s in samples),
                       "params": params, "peak_flops": peak}, "rows": rows}


def render(result: dict) -> str:
    c, rows = result["config"], result["rows"]
    cols = {"layout": "layout", "steps": "steps", "seconds": "seconds", "first_step_s": "first step s",
            "real_tokens_per_s": "real tokens/s", "padding": "padding", "mfu": "MFU", "speedup": "speedup",
            "peak_rss_gb": "peak RSS GB"}
    packed, padded = rows[0], rows[1]
    out = [f"{c['params'] / 1e6:.1f}M parameters, {c['samples']} samples ({c['real_tokens']} tokens); MFU against "
           f"the float32 matmul peak of this run, {c['peak_flops'] / 1e9:.0f} GFLOP/s.", "",
           table(rows[:2], cols), "",
           verdict(packed["speedup"] >= 2.0, "packing at least 2x the tokens/s of padding on this length mix",
                   f"{packed['speedup']:.2f}x. Packing removes the {padded['padding']:.0%} padding, but the padded "
                   "batches already skip the LM head on padding (only supervised positions get logits) and their "
                   "attention is over shorter rows, so the saving is smaller than the padding share; the "
                   "paper's 3-4x also includes parallelism one CPU cannot show."), "",
           "Activation checkpointing, bfloat16 autocast (`autocast=\"bfloat16\"`: the decoder layers' products; "
           "MFU still against the float32 peak) and torch.compile (speedup relative to the plain packed run on the same rows; "
           "`first step s` includes compilation):", "", table(rows[2:], cols)]
    return "\n".join(out)
