"""Vision encoder speed: SigLIP2-so400m-sized NaViT (27 blocks x 1152, 16 heads, patch 16, all blocks full
attention as in the default config; random weights; the visual head after the ViT is not included).

Per-image time at 448^2, 896^2 and 1792^2: the 27 blocks are identical, so a 1-block and a 2-block encoder
are timed side by side and the time is extrapolated to 27 blocks (fixed cost + 27 x per-block cost); in the
full run the 27-block encoder is also timed directly at 448^2 to check the extrapolation. 1792^2 is skipped
in --quick (minutes per image on 2 CPU cores). Packed vs per-image: several images of mixed size through one
call vs one call each, on a shallower encoder (the ratio does not depend on depth).
"""
from __future__ import annotations

import torch

from common import PeakMemory, device, interleaved, pick, table, timeit, verdict
from ovis25.config import VisionConfig
from ovis25.model.vision import SiglipNaViT


def encoder(layers: int, dtype: torch.dtype = torch.float32) -> SiglipNaViT:
    torch.manual_seed(0)
    return SiglipNaViT(VisionConfig(num_hidden_layers=layers)).eval().to(device(), dtype)


def image(h: int, w: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(h * w // 256, 768, device=device(), dtype=dtype), torch.tensor([[1, h // 16, w // 16]])


@torch.inference_mode()
def per_image(side: int, dtype: torch.dtype, repeat: int, warmup: int) -> dict:
    one, two = encoder(1, dtype), encoder(2, dtype)
    px, grid = image(side, side, dtype)
    with PeakMemory() as mem:
        t = interleaved({1: lambda: one(px, grid), 2: lambda: two(px, grid)}, repeat=repeat, warmup=warmup)
    block = max(t[2] - t[1], 0.0)
    return {"image": f"{side}x{side}", "dtype": str(dtype).removeprefix("torch."), "patches": px.shape[0],
            "ms_per_block": block * 1e3, "ms_27_blocks": (t[1] - block + 27 * block) * 1e3, **mem.columns()}


@torch.inference_mode()
def packed_vs_single(layers: int, sizes: list[tuple[int, int]], repeat: int) -> dict:
    vit = encoder(layers)
    inputs = [image(h, w) for h, w in sizes]
    pixels, grids = torch.cat([p for p, _ in inputs]), torch.cat([g for _, g in inputs])
    with PeakMemory() as mem:
        t = interleaved({"packed": lambda: vit(pixels, grids), "single": lambda: [vit(p, g) for p, g in inputs]},
                        repeat=repeat)
    return {"layers": layers, "images": " + ".join(f"{h}x{w}" for h, w in sizes), "patches": pixels.shape[0],
            "packed_ms": t["packed"] * 1e3, "single_ms": t["single"] * 1e3, "speedup": t["single"] / t["packed"],
            **mem.columns()}


def run(mode: str) -> dict:
    sides = pick(mode, [448, 896, 1792], [448, 896], [32])
    repeat = pick(mode, 3, 2, 1)
    rows = []
    for side in sides:
        big = side >= 1792
        rows.append(per_image(side, torch.float32, 1 if big else repeat, 0 if big else 1))
        if side <= 896:  # bfloat16 matmuls are much faster on CPUs with AVX512-BF16 / AMX
            rows.append(per_image(side, torch.bfloat16, repeat, 1))
    direct = None
    if mode == "full":
        vit = encoder(27)
        px, grid = image(448, 448)
        with PeakMemory() as mem, torch.inference_mode():
            direct = {"ms": timeit(lambda: vit(px, grid), repeat=2) * 1e3}
        direct.update(mem.columns())
        del vit
    sizes = pick(mode, [(448, 448), (320, 640), (512, 384), (224, 224), (256, 768), (160, 160)],
                 [(448, 448), (320, 640), (224, 224), (160, 160)], [(32, 32), (32, 64)])
    packed = packed_vs_single(pick(mode, 4, 2, 1), sizes, pick(mode, 3, 2, 1))
    return {"config": {"vit": "so400m: 27 x 1152, mlp 4304, 16 heads, patch 16", "device": str(device())},
            "rows": rows, "direct_448": direct, "packed": packed}


def render(result: dict) -> str:
    out = [table(result["rows"], {"image": "image", "dtype": "dtype", "patches": "patches",
                                  "ms_per_block": "ms per block", "ms_27_blocks": "ms per image (27 blocks)",
                                  "peak_rss_gb": "peak RSS GB (2-block encoder)"})]
    d = result["direct_448"]
    if d:
        est = next(r for r in result["rows"] if r["image"] == "448x448" and r["dtype"] == "float32")
        out.append(f"\nCheck of the extrapolation: the 27-block encoder timed directly at 448x448 took "
                   f"{d['ms']:.0f} ms (extrapolated {est['ms_27_blocks']:.0f} ms; peak RSS {d['peak_rss_gb']:.2f} GB).")
    p = result["packed"]
    out += ["", table([p], {"images": "images", "patches": "patches", "layers": "blocks", "packed_ms": "packed ms",
                            "single_ms": "one call per image ms", "speedup": "packed speedup",
                            "peak_rss_gb": "peak RSS GB"}), ""]
    out.append(verdict(p["speedup"] > 1.05, "packed multi-image faster than one call per image (by more than 5%)",
                       "on CPU the time is in the dense layers, whose cost is the same per row whether the rows "
                       "come in one call or several; attention over images of different sizes runs one SDPA call "
                       "per image either way. Packing pays off where per-call overhead matters (GPU kernel "
                       "launches, small images)."))
    return "\n".join(out)
