"""Generation speed, side by side in one run: our engine vs transformers' `generate` on a Qwen3 with the
same random weights (text only, greedy, fixed length), and the thinking budget done in one pass over the
KV cache vs the reference's re-prefill of the whole prompt.

Model: Qwen3-0.6B shape (28 layers x 1024, 16/8 heads, vocab 151936; `--quick`: 4 layers), float32.
Decode is memory bound: every step reads all weights once, so the bound is
  tokens/s <= batch * measured memory bandwidth / weight bytes.
    python benchmarks/generation.py [--quick]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import table, write_results
from core import QWEN3_06B
from ovis25.config import OvisConfig, Qwen3Config, VisionConfig
from ovis25.generation import Engine, GenerationConfig
from ovis25.model import Ovis
from ovis25.processing import Tokenizer

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/fixtures/models/tiny-tied"
NO_EOS = (10**9,)  # never produced: every request runs to max_new_tokens


def memory_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), best of a few."""
    a = torch.empty(64 * 2**20 // 4)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0))
    return best


def ours_generate(engine: Engine, prompts: list[torch.Tensor], new: int) -> tuple[float, float]:
    """(time to first token, total seconds) for one batch."""
    cfg = GenerationConfig(max_new_tokens=new, eos_token_ids=NO_EOS)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, config=cfg) for p in prompts]
    ttft = None
    while engine.has_unfinished():
        engine.step()
        ttft = ttft or time.perf_counter() - t0
    for i in ids:
        engine.abort(i)  # release finished slots
    return ttft, time.perf_counter() - t0


def hf_generate(hf, prompts: list[torch.Tensor], new: int) -> tuple[float, float]:
    batch = torch.stack(prompts)  # equal lengths: no padding needed
    t0 = time.perf_counter()
    hf.generate(batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return ttft, time.perf_counter() - t0


def main() -> None:
    import transformers
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = 4 if args.quick else 28
    cfg = dict(QWEN3_06B, num_hidden_layers=layers)
    hf_cfg = transformers.Qwen3Config(**cfg, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                                      eos_token_id=None, pad_token_id=0)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    model = Ovis(OvisConfig(VisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2), Qwen3Config(**cfg), 1024)).eval()
    model.llm.load_state_dict(hf.state_dict(), strict=False)
    tokenizer = Tokenizer.from_pretrained(FIXTURE_TOKENIZER)
    prompt_len, new = (64, 16) if args.quick else (256, 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    bandwidth = memory_bandwidth()
    rows = []
    with torch.no_grad():
        for batch in (1, 4) if args.quick else (1, 4, 16):
            prompts = [torch.randint(0, 150000, (prompt_len,)) for _ in range(batch)]
            engine = Engine(model, tokenizer, max_batch_size=batch, max_len=prompt_len + new + 8)
            ours_generate(engine, prompts, 2)  # warm-up
            o_ttft, o_total = ours_generate(engine, prompts, new)
            h_ttft, h_total = hf_generate(hf, prompts, new)
            o_decode = batch * (new - 1) / max(o_total - o_ttft, 1e-9)
            h_decode = batch * (new - 1) / max(h_total - h_ttft, 1e-9)
            bound = batch * bandwidth / weight_bytes
            rows.append({"batch": batch, "ours_ttft_s": o_ttft, "hf_ttft_s": h_ttft, "ours_decode_tok_s": o_decode,
                         "hf_decode_tok_s": h_decode, "decode_ratio": o_decode / h_decode,
                         "bandwidth_bound_tok_s": bound, "ours_vs_bound": o_decode / bound})
            print(rows[-1], flush=True)
        # thinking budget: one pass (append the early-stop text to the cache) vs re-prefill from scratch
        budget, think_new = (8, 64) if args.quick else (32, 160)
        think_prompt = 4 * prompt_len  # a long prompt (e.g. an image question): what re-prefill repeats
        engine = Engine(model, tokenizer, max_batch_size=1, max_len=think_prompt + think_new + 64)
        prompt = torch.randint(0, 150000, (think_prompt,))
        gc = GenerationConfig(max_new_tokens=think_new, eos_token_ids=NO_EOS, enable_thinking=True,
                              thinking_budget=budget)
        t0 = time.perf_counter()
        engine.generate([{"input_ids": prompt, "pixel_values": None, "grid_thws": None}], gc)
        one_pass = time.perf_counter() - t0
        one_pass_prefills = engine.stats.prefill_calls
        # the reference: phase 1, then a fresh prefill of prompt + phase 1 + early-stop ids, then phase 2
        t0 = time.perf_counter()
        p1 = GenerationConfig(max_new_tokens=budget, eos_token_ids=NO_EOS)
        res = engine.generate([{"input_ids": prompt, "pixel_values": None, "grid_thws": None}], p1)[0]
        early = tokenizer.encode("\n\nConsidering the limited time by the user, I have to give the solution based "
                                 "on the thinking directly now.\n</think>\n\n")
        second = torch.cat([prompt, torch.tensor(res.token_ids + early)])
        p2 = GenerationConfig(max_new_tokens=think_new - budget - len(early), eos_token_ids=NO_EOS)
        engine.generate([{"input_ids": second, "pixel_values": None, "grid_thws": None}], p2)
        reprefill = time.perf_counter() - t0
    rows.append({"batch": "thinking budget", "one_pass_s": one_pass, "reprefill_s": reprefill,
                 "speedup": reprefill / one_pass, "prefill_calls_one_pass": one_pass_prefills})
    print(table(rows[:-1], ["batch", "ours_ttft_s", "hf_ttft_s", "ours_decode_tok_s", "hf_decode_tok_s",
                            "decode_ratio", "bandwidth_bound_tok_s", "ours_vs_bound"]))
    print(table(rows[-1:], ["batch", "one_pass_s", "reprefill_s", "speedup", "prefill_calls_one_pass"]))
    print(f"weights {weight_bytes / 1e9:.2f} GB, memory bandwidth {bandwidth / 1e9:.1f} GB/s, prompt {prompt_len}, "
          f"new tokens {new}")
    write_results("generation" + ("-quick" if args.quick else ""), rows,
                  {"layers": layers, "prompt_len": prompt_len, "new_tokens": new, "weight_bytes": weight_bytes,
                   "bandwidth": bandwidth})


if __name__ == "__main__":
    main()
