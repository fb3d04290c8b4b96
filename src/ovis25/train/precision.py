"""Mixed precision for training: which dtype the matrix products run in, chosen per machine.

Master weights, optimizer state and the exported checkpoint stay float32; under autocast only the products
(and what torch lists with them) run in bfloat16. On CPUs with native bfloat16 products (AVX512-BF16, AMX)
they are several times faster than float32's, and the tiny demo model's steps are mostly products.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

# auto: bfloat16 on a CPU only where its products are at least this much faster than float32's. Measured with
# the demo's P2: 4.2x faster products made it 1.5-1.7x faster (AMD Zen 5); on a Zen 4 (2.2x) whole-model autocast,
# then with bfloat16 attention, ran at 0.89x float32's speed, and AVX2-only CPUs emulate bfloat16.
CPU_SPEEDUP_NEEDED = 3.0


def matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seconds: float = 0.3,
                 n: int = 1024) -> float:
    """Dense matmul FLOP/s of this machine in `dtype`: the fastest of many n^3 products, so that a briefly busy
    machine does not lower it (and inflate an MFU measured against it)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@functools.cache
def _cpu_bfloat16_pays() -> bool:
    return matmul_flops(torch.bfloat16) >= CPU_SPEEDUP_NEEDED * matmul_flops(torch.float32)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """A recipe's `autocast` ("auto" | "bfloat16" | "off") -> the dtype products run in; None: float32.
    auto picks bfloat16 on GPUs that support it and on CPUs where it pays (`CPU_SPEEDUP_NEEDED`)."""
    if mode == "off":
        return None
    if mode == "bfloat16":
        return torch.bfloat16
    if mode != "auto":
        raise ValueError(f"autocast must be 'auto', 'bfloat16' or 'off', got {mode!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_bfloat16_pays() else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The context a training forward runs in: autocast to `dtype`, or nothing for float32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
