"""Core model speed on a mid-size random config, side by side in one run.

  vision: SigLIP2-so400m-sized NaViT at 448x448 (one image) and 4 images packed vs one call each
  llm:    prefill of a 0.6B-sized Qwen3 (ours) vs transformers' Qwen3ForCausalLM with the same weights
    python benchmarks/core.py [--quick]
"""
from __future__ import annotations

import argparse
import resource

import torch

from common import table, timeit, write_results
from ovis25.config import OvisConfig, Qwen3Config, VisionConfig
from ovis25.model import Ovis

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_vision(quick: bool) -> list[dict]:
    vc = VisionConfig(num_hidden_layers=6 if quick else 27)
    model = Ovis(OvisConfig(vc, Qwen3Config(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                            vocab_size=128), 1024)).eval()
    vit = model.visual_tokenizer.vit
    rows = []
    with torch.no_grad():
        for side in (448,) if quick else (448, 896):
            g = side // 16
            grid = torch.tensor([[1, g, g]])
            px = torch.randn(g * g, 768)
            t = timeit(lambda: vit(px, grid), repeat=2 if quick else 3)
            rows.append({"part": f"vit {vc.num_hidden_layers}L {side}px x1", "ms": t * 1e3,
                         "tokens_per_s": g * g / t, "peak_rss_mb": peak_rss_mb()})
        sizes = [(448, 448), (320, 640), (512, 384), (224, 224)]
        grids = torch.tensor([[1, h // 16, w // 16] for h, w in sizes])
        pxs = [torch.randn(h * w // 256, 768) for h, w in sizes]
        packed = timeit(lambda: vit(torch.cat(pxs), grids), repeat=2)
        single = timeit(lambda: [vit(p, g[None]) for p, g in zip(pxs, grids)], repeat=2)
        n = sum(p.shape[0] for p in pxs)
        rows.append({"part": "vit 4 mixed images packed", "ms": packed * 1e3, "tokens_per_s": n / packed,
                     "speedup": single / packed})
        rows.append({"part": "vit 4 mixed images one call each", "ms": single * 1e3, "tokens_per_s": n / single,
                     "speedup": 1.0})
    return rows


def bench_llm(quick: bool) -> list[dict]:
    import transformers
    cfg = dict(QWEN3_06B, num_hidden_layers=4 if quick else 28)
    hf_cfg = transformers.Qwen3Config(**cfg, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    ours = Ovis(OvisConfig(VisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2), Qwen3Config(**cfg), 1024)).eval()
    missing = ours.llm.load_state_dict(hf.state_dict(), strict=False)
    assert not missing.missing_keys, missing
    rows = []
    with torch.no_grad():
        for length in (128,) if quick else (512, 2048):
            ids = torch.randint(0, 150000, (1, length))
            ref = hf(ids, logits_to_keep=1).logits
            got = ours(ids, logits_to_keep=1).logits
            diff = (ref - got).abs().max().item()
            t_hf = timeit(lambda: hf(ids, logits_to_keep=1), repeat=2 if quick else 3)
            t_ours = timeit(lambda: ours(ids, logits_to_keep=1), repeat=2 if quick else 3)
            layers = cfg["num_hidden_layers"]
            rows.append({"part": f"qwen3-0.6B-shape {layers}L prefill {length}", "ours_tok_s": length / t_ours,
                         "transformers_tok_s": length / t_hf, "ratio": t_hf / t_ours, "max_logit_diff": diff})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    vision = bench_vision(args.quick)
    print(table(vision, ["part", "ms", "tokens_per_s", "speedup", "peak_rss_mb"]))
    llm = bench_llm(args.quick)
    print(table(llm, ["part", "ours_tok_s", "transformers_tok_s", "ratio", "max_logit_diff"]))
    write_results("core" + ("-quick" if args.quick else ""), vision + llm, {"quick": args.quick,
                                                                            "llm": QWEN3_06B})


if __name__ == "__main__":
    main()
