"""Attention kernels shared by the vision encoder and the LLM.

Packed ("varlen") attention runs several independent segments that are laid out back to back in one
sequence. With flash-attn installed on CUDA we call its varlen kernel; otherwise we group the segments
by length and run one SDPA call per distinct length, which on CPU beats both a Python loop per segment
and a single SDPA with a block-diagonal mask (see benchmarks/attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: only used on CUDA
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding; cos/sin broadcast against x (..., head_dim)."""
    return x * cos + rotate_half(x) * sin


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA on (H, L, D) tensors. A batch dimension is added because on CPU 3-D inputs fall back to the math
    kernel, which materialises the (H, L, L) scores: 3x slower at 3136 tokens and out of memory at 1792^2
    images; with 4-D inputs the flash kernel runs."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]


def segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


# Not traced by torch.compile: the segment bookkeeping is Python over the lengths, so a compiled block would
# be recompiled for every new set of lengths (each packed row has its own); the block compiles around it.
@torch.compiler.disable
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     causal: bool, backend: str = "auto") -> torch.Tensor:
    """Attention confined to segments of a packed sequence.

    q: (T, Hq, D), k/v: (T, Hkv, D) with Hq a multiple of Hkv; cu_seqlens: (S+1,) int offsets.
    Returns (T, Hq, D).  backend: "auto" | "flash" | "grouped" | "loop" | "masked".
    """
    if backend == "auto":
        backend = "flash" if flash_attn_varlen_func is not None and q.is_cuda else "grouped"
    if not q.is_cuda and torch.is_autocast_enabled("cpu"):
        # in float32: CPU autocast would run SDPA in bfloat16, whose backward there is ~6x slower than float32's
        with torch.autocast("cpu", enabled=False):
            return varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, causal, backend)
    lengths = segment_lengths(cu_seqlens)
    if backend == "flash":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
    gqa = q.shape[1] != k.shape[1]
    if backend == "masked":
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))
        mask = seg[:, None] == seg[None, :]
        if causal:
            mask = mask.tril()
        out = sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=gqa)
        return out.transpose(0, 1)
    if backend == "loop" or len(set(lengths)) == len(lengths):
        outs = []
        for start, n in zip(cu_seqlens[:-1].tolist(), lengths):
            s = slice(start, start + n)
            o = sdpa(q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1), is_causal=causal, enable_gqa=gqa)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    # grouped: segments of equal length are stacked into one batch and share one kernel call
    out = None  # allocated with the kernel's dtype
    starts = torch.as_tensor(cu_seqlens[:-1].tolist(), device=q.device)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    for n, segs in by_len.items():
        if n == 0:
            continue
        idx = (starts[segs][:, None] + torch.arange(n, device=q.device)).reshape(-1)  # (len(segs)*n,)
        qs, ks, vs = (t[idx].view(len(segs), n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa)
        if out is None:
            out = o.new_empty(q.shape)
        out[idx] = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
    return torch.empty_like(q) if out is None else out  # None: every segment was empty
