"""Packed (varlen) attention options: per-segment loop vs length-grouped SDPA vs one SDPA with a
block-diagonal mask (and flash-attn's varlen kernel on CUDA when installed), forward and forward+backward.

Workloads: (a) ViT window attention of an 896x896 image (so400m: 16 heads x 72), windows of 3x3 groups
(2x2 patches each) = 36 patches plus partial windows; (b) ViT full attention over 4 video frames of
448x448; (c) LLM causal attention over a packed batch of 8 samples of mixed lengths (16 q / 8 kv heads x 128).
"""
from __future__ import annotations

import torch

from common import PeakMemory, device, pick, table, timeit
from ovis25.model.attention import varlen_attention


def workloads(mode: str):
    lens = []  # (a) 896 px = 28x28 groups of 2x2 patches; windows of 3x3 groups (window_size 112)
    for wi in range(0, 28, 3):
        for wj in range(0, 28, 3):
            lens.append(min(3, 28 - wi) * min(3, 28 - wj) * 4)
    llm = [700, 420, 1100, 260, 900, 530, 380, 96]
    if mode == "smoke":
        return [("vit windows 896px", lens[:8], 4, 4, 16, False), ("llm packed 3 samples", [40, 24, 16], 4, 2, 16, True)]
    full = [("ViT windows, 896 px image (16 heads x 72)", lens, 16, 16, 72, False),
            ("ViT full attention, 4 frames of 448 px", [784] * 4, 16, 16, 72, False),
            ("LLM causal, 8 packed samples of mixed length (16 q / 8 kv heads x 128)", llm, 16, 8, 128, True)]
    return full if mode == "full" else [full[0], ("LLM causal, 4 packed samples of mixed length (16 q / 8 kv "
                                                  "heads x 128)", llm[:4], 16, 8, 128, True)]


def run(mode: str) -> dict:
    torch.manual_seed(0)
    backends = ["loop", "grouped", "masked"]
    if device().type == "cuda":
        from ovis25.model.attention import flash_attn_varlen_func
        backends += ["flash"] if flash_attn_varlen_func is not None else []
    repeat = pick(mode, 3, 1, 1)
    rows = []
    for name, lens, hq, hkv, d, causal in workloads(mode):
        total = sum(lens)
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(total, h, d, device=device(), requires_grad=True) for h in (hq, hkv, hkv))
        ref = varlen_attention(q, k, v, cu, causal, "loop")
        for backend in backends:
            with PeakMemory() as mem:
                err = (varlen_attention(q, k, v, cu, causal, backend) - ref).abs().max().item()
                fwd = timeit(lambda: varlen_attention(q, k, v, cu, causal, backend), repeat=repeat)
                fb = timeit(lambda: varlen_attention(q, k, v, cu, causal, backend).sum().backward(), repeat=repeat)
            rows.append({"workload": name, "segments": len(lens), "tokens": total, "backend": backend,
                         "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3, "max_diff_vs_loop": err, **mem.columns()})
    for r in rows:
        base = next(b for b in rows if b["workload"] == r["workload"] and b["backend"] == "loop")
        r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return {"config": {"repeat": repeat, "backends": backends}, "rows": rows}


def render(result: dict) -> str:
    rows, last = [], None
    for r in result["rows"]:  # one block per workload
        shown = dict(r, backend=f"**{r['backend']}**" if r["backend"] == "grouped" else r["backend"])
        if r["workload"] == last:
            shown.update(workload="", segments="", tokens="")
        rows.append(shown)
        last = r["workload"]
    diff = max(r["max_diff_vs_loop"] for r in result["rows"])
    return table(rows, {"workload": "workload", "segments": "segments", "tokens": "tokens", "backend": "backend",
                        "fwd_ms": "fwd ms", "fwd_bwd_ms": "fwd+bwd ms", "fwd_speedup": "fwd speedup vs loop",
                        "fwd_bwd_speedup": "fwd+bwd speedup vs loop", "peak_rss_gb": "peak RSS GB"}) + \
        f"\n\nAll backends agree with the loop to {diff:.1g}."
