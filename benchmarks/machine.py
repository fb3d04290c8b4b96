"""Machine limits: dense matmul FLOP/s (float32, bfloat16) and memory bandwidth, the denominators of the
MFU and bandwidth-bound columns elsewhere."""
from __future__ import annotations

import time

import torch

from common import device, pick, sync, table
from ovis25.train.precision import matmul_flops as train_matmul_flops


def matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    return train_matmul_flops(dtype, device(), seconds, n)


def memory_bandwidth(mib: int = 1024, repeat: int = 5) -> dict[str, float]:
    """Bytes/s of reading a tensor far larger than the caches (a sum) and of copying it (read + write)."""
    a = torch.empty(mib * 2**20 // 4, device=device()).uniform_()
    b = torch.empty_like(a)
    read = copy = 0.0
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        a.sum()
        sync()
        t1 = time.perf_counter()
        b.copy_(a)
        sync()
        t2 = time.perf_counter()
        read, copy = max(read, a.nbytes / (t1 - t0)), max(copy, 2 * a.nbytes / (t2 - t1))
    return {"read": read, "copy": copy}


def run(mode: str) -> dict:
    seconds = pick(mode, 2.0, 1.0, 0.1)
    n = pick(mode, 2048, 1024, 256)
    mib = pick(mode, 1024, 512, 64)
    bw = memory_bandwidth(mib)
    rows = [{"what": f"matmul float32 {n}^3", "value": matmul_flops(torch.float32, n, seconds) / 1e9, "unit": "GFLOP/s"},
            {"what": f"matmul bfloat16 {n}^3", "value": matmul_flops(torch.bfloat16, n, seconds) / 1e9, "unit": "GFLOP/s"},
            {"what": f"memory read ({mib} MiB sum)", "value": bw["read"] / 1e9, "unit": "GB/s"},
            {"what": f"memory copy ({mib} MiB, read + write)", "value": bw["copy"] / 1e9, "unit": "GB/s"}]
    return {"config": {"n": n, "seconds": seconds, "mib": mib, "device": str(device())}, "rows": rows,
            "peak_flops_fp32": rows[0]["value"] * 1e9, "peak_flops_bf16": rows[1]["value"] * 1e9,
            "bandwidth": bw["read"]}


def render(result: dict) -> str:
    return table(result["rows"], {"what": "measurement", "value": "value", "unit": "unit"})
