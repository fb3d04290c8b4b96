"""Packed (varlen) attention options on this machine: per-segment loop vs length-grouped SDPA vs one
SDPA with a block-diagonal mask (and flash-attn on CUDA when installed).

Workloads: (a) ViT window attention of a 896x896 image (so400m-like: 16 heads x 72), windows of 7x7
groups = 196 patches, plus partial windows; (b) ViT full attention of 4 video frames of 448x448;
(c) LLM causal attention over a packed batch of 8 samples of mixed lengths (16 q / 8 kv heads x 128).
Forward and forward+backward.
    python benchmarks/attention.py
"""
from __future__ import annotations

import torch

from common import table, timeit, write_results
from ovis25.model.attention import varlen_attention


def workloads():
    g = torch.Generator().manual_seed(0)
    # (a) 896x896 image = 56x56 patches = 28x28 groups; windows of 3x3 groups (window_size 112 -> 3 groups)
    lens = []
    for wi in range(0, 28, 3):
        for wj in range(0, 28, 3):
            lens.append(min(3, 28 - wi) * min(3, 28 - wj) * 4)
    yield "vit windows 896px", lens, 16, 16, 72, False
    yield "vit frames 4x448px", [784] * 4, 16, 16, 72, False
    yield "llm packed 8 samples", [700, 420, 1100, 260, 900, 530, 380, 96], 16, 8, 128, True
    _ = g


def main() -> None:
    torch.manual_seed(0)
    rows = []
    backends = ["loop", "grouped", "masked"] + (["flash"] if torch.cuda.is_available() else [])
    for name, lens, hq, hkv, d, causal in workloads():
        total = sum(lens)
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        q = torch.randn(total, hq, d, requires_grad=True)
        k = torch.randn(total, hkv, d, requires_grad=True)
        v = torch.randn(total, hkv, d, requires_grad=True)
        ref = None
        for backend in backends:
            out = varlen_attention(q, k, v, cu, causal, backend)
            ref = out if ref is None else ref
            err = (out - ref).abs().max().item()
            fwd = timeit(lambda: varlen_attention(q, k, v, cu, causal, backend), repeat=3)
            fb = timeit(lambda: varlen_attention(q, k, v, cu, causal, backend).sum().backward(), repeat=3)
            rows.append({"workload": name, "segments": len(lens), "tokens": total, "backend": backend,
                         "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3, "max_diff_vs_loop": err})
            print(rows[-1], flush=True)
    for r in rows:
        base = next(b for b in rows if b["workload"] == r["workload"] and b["backend"] == "loop")
        r["fwd_speedup_vs_loop"] = base["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup_vs_loop"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    cols = ["workload", "segments", "tokens", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_loop",
            "fwd_bwd_speedup_vs_loop", "max_diff_vs_loop"]
    print(table(rows, cols))
    write_results("attention", rows, {"threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
