"""LLM speed against transformers' Qwen3ForCausalLM holding the same weights (Qwen3-0.6B shape: 28 layers
x 1024, 16 q / 8 kv heads x 128, MLP 3072, vocab 151936, tied embeddings; random weights, float32;
--quick: 4 layers).

  prefill: one forward over a prompt, logits of the last position only (ours: `Ovis.forward`; transformers:
           `forward(logits_to_keep=1)`), timed side by side;
  decode:  batches of 1/4/16 equal-length random prompts. Ours is the serving engine (`Engine.step()`, which
           includes its bookkeeping: sampling, incremental detokenisation) by default and with
           `compile_decode=True`; transformers is its bare forward with its DynamicCache plus an argmax (no
           `generate()` overhead, so a lower bound on its cost). One decode step of each is run in turn and
           the median step time gives tokens/s. TTFT: the first step (prefill + first token) of each.
  bound:   decode streams all weights (and the KV cache) once per step, so tokens/s <= batch x memory read
           bandwidth / bytes per step, with the bandwidth measured in the same run.
"""
from __future__ import annotations

import statistics
import time

import torch

from common import SMOKE_LLM, PeakMemory, fixture_tokenizer, interleaved, pick, qwen3_pair, sync, table, verdict
from ovis25.generation import Engine, GenerationConfig

NO_EOS = (10**9,)  # never produced: every request runs to max_new_tokens


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes, looking inside tensor subclasses (torchao's quantized weights)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(llm: torch.nn.Module) -> int:
    """Bytes a decode step streams: every LLM weight once, except an embedding table that is not also the
    LM head (the lookup reads only a few rows)."""
    embed = llm.model.embed_tokens.weight
    tied = getattr(llm.lm_head, "weight", None) is embed
    return sum(tensor_bytes(t) for t in {id(t): t for t in [*llm.parameters(), *llm.buffers()]}.values()
               if tied or t is not embed)


def kv_bytes_per_step(cfg, batch: int, context: int, element_size: int = 4) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element_size * context * batch


@torch.inference_mode()
def prefill(hf, ours, length: int, repeat: int) -> dict:
    ids = torch.randint(0, ours.config.llm_config.vocab_size, (1, length), device=ours.vte.weight.device)
    diff = (hf(ids, logits_to_keep=1).logits - ours(ids, logits_to_keep=1).logits).abs().max().item()
    with PeakMemory() as mem:
        t = interleaved({"ours": lambda: ours(ids, logits_to_keep=1), "hf": lambda: hf(ids, logits_to_keep=1)},
                        repeat=repeat)
    return {"tokens": length, "ours_tok_s": length / t["ours"], "hf_tok_s": length / t["hf"],
            "ratio": t["hf"] / t["ours"], "max_logit_diff": diff, **mem.columns()}


class HFDecoder:
    """transformers' decode loop without generate(): forward with its cache, argmax."""

    def __init__(self, hf, prompts: torch.Tensor):
        self.hf, self.prompts = hf, prompts

    def prefill(self) -> None:
        out = self.hf(self.prompts, use_cache=True, logits_to_keep=1)
        self.past, self.next = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        out = self.hf(self.next, past_key_values=self.past, use_cache=True)
        self.past, self.next = out.past_key_values, out.logits[:, -1:].argmax(-1)


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def decode_rates(steppers: dict, batch: int, steps: int) -> dict[str, float]:
    """tokens/s of each decode-step function, from the median of `steps` steps run in turn (a, b, c, a, ...)
    so that load from other processes hits all of them alike."""
    times = {name: [] for name in steppers}
    for _ in range(steps):
        for name, step in steppers.items():
            times[name].append(timed(step))
    return {name: batch / statistics.median(t) for name, t in times.items()}


def engine_with_requests(model, tokenizer, prompts: torch.Tensor, steps: int, **options) -> tuple[Engine, float]:
    """An engine that has run a short warm-up request (compiling what it compiles) and then admitted
    `prompts`; returns it and the time of that admitting step (prefill + first token = TTFT)."""
    engine = Engine(model, tokenizer, max_batch_size=len(prompts), max_len=prompts.shape[1] + steps + 8, **options)
    for p in prompts:
        engine.add_request(p[:8], config=GenerationConfig(max_new_tokens=3, eos_token_ids=NO_EOS))
    while engine.has_unfinished():
        engine.step()
    for p in prompts:
        engine.add_request(p, config=GenerationConfig(max_new_tokens=steps + 2, eos_token_ids=NO_EOS))
    return engine, timed(engine.step)


@torch.inference_mode()
def decode(hf, ours, tokenizer, batch: int, prompt_len: int, steps: int, bandwidth: float) -> dict:
    prompts = torch.randint(0, ours.config.llm_config.vocab_size, (batch, prompt_len))
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        eager, ttft = engine_with_requests(ours, tokenizer, prompts, steps)
        t1 = time.perf_counter()
        compiled, _ = engine_with_requests(ours, tokenizer, prompts, steps, compile_decode=True)
        warmup = time.perf_counter() - t1 - (t1 - t0)  # what compiling added to the same work
        reference = HFDecoder(hf, prompts.to(ours.vte.weight.device))
        ttft_hf = timed(reference.prefill)
        tok_s = decode_rates({"eager": eager.step, "compiled": compiled.step, "hf": reference.step}, batch, steps)
    per_step = weight_bytes(ours.llm) + kv_bytes_per_step(ours.config.llm_config, batch, prompt_len + steps // 2)
    bound = batch * bandwidth / per_step
    return {"batch": batch, "ttft_ours_s": ttft, "ttft_hf_s": ttft_hf,
            "eager_tok_s": tok_s["eager"], "compiled_tok_s": tok_s["compiled"], "hf_tok_s": tok_s["hf"],
            "eager_ratio": tok_s["eager"] / tok_s["hf"], "compiled_ratio": tok_s["compiled"] / tok_s["hf"],
            "bound_tok_s": bound, "eager_vs_bound": tok_s["eager"] / bound,
            "compiled_vs_bound": tok_s["compiled"] / bound, "compile_warmup_s": max(warmup, 0.0),
            **mem.columns()}


def run(mode: str, limits: dict | None = None) -> dict:
    from machine import memory_bandwidth
    layers = pick(mode, 28, 4, 1)
    overrides = pick(mode, {}, {}, SMOKE_LLM)
    bandwidth = (limits or {}).get("bandwidth") or memory_bandwidth(pick(mode, 1024, 512, 64))["read"]
    hf, ours = qwen3_pair(layers, **overrides)
    tokenizer = fixture_tokenizer()
    rows = [prefill(hf, ours, n, pick(mode, 2, 2, 1)) for n in pick(mode, [512, 2048], [256], [16])]
    prompt_len, steps = pick(mode, (128, 24), (64, 12), (8, 3))
    decode_rows = [decode(hf, ours, tokenizer, b, prompt_len, steps, bandwidth)
                   for b in pick(mode, [1, 4, 16], [1, 4], [1, 2])]
    config = {"layers": layers, "shape": {**overrides} or "Qwen3-0.6B", "prompt_len": prompt_len,
              "decode_steps": steps, "weight_bytes": weight_bytes(ours.llm), "bandwidth": bandwidth}
    return {"config": config, "prefill": rows, "decode": decode_rows}


def render(result: dict) -> str:
    c = result["config"]
    pre, dec = result["prefill"], result["decode"]
    out = [f"Configuration: {c['layers']} layers, shape {c['shape']}; weights {c['weight_bytes'] / 1e9:.2f} GB "
           f"(float32); memory read bandwidth {c['bandwidth'] / 1e9:.1f} GB/s (measured in this run).", "",
           table(pre, {"tokens": "prefill tokens", "ours_tok_s": "ours tok/s", "hf_tok_s": "transformers tok/s",
                       "ratio": "ratio", "max_logit_diff": "max logit diff", "peak_rss_gb": "peak RSS GB (both models)"}),
           ""]
    worst = min(pre, key=lambda r: r["ratio"])
    out.append(verdict(worst["ratio"] >= 1.0, "prefill at least as fast as transformers (ratio >= 1.0)",
                       f"{worst['ratio']:.4f}x at {worst['tokens']} tokens. Both forwards are the same MKL "
                       "matmuls and SDPA calls (>95% of the time); what differs is the float32 RMSNorm/RoPE "
                       "glue, a few percent, which is within this machine's run-to-run noise.",
                       parity=worst["ratio"] >= 0.98))
    out += ["", f"Decode: prompts of {c['prompt_len']} random tokens, {c['decode_steps']} steps timed per "
                "implementation.", "",
            table(dec, {"batch": "batch", "ttft_ours_s": "ours TTFT s", "ttft_hf_s": "transformers TTFT s",
                        "eager_tok_s": "ours tok/s", "compiled_tok_s": "ours compile_decode tok/s",
                        "hf_tok_s": "transformers tok/s", "eager_ratio": "ours / transformers",
                        "compiled_ratio": "compile_decode / transformers", "bound_tok_s": "bound tok/s",
                        "eager_vs_bound": "ours / bound", "compiled_vs_bound": "compile_decode / bound",
                        "peak_rss_gb": "peak RSS GB (both models)"}), ""]
    first = dec[0]
    worst = min(dec, key=lambda r: r["eager_ratio"])
    out.append(verdict(worst["eager_ratio"] >= 1.0, "decode at least as fast as transformers at every batch, "
                       "default engine", f"batch {worst['batch']} runs at {worst['eager_ratio']:.3f}x: both run "
                       "the same MKL matrix-vector products, which dominate; use compile_decode.",
                       parity=worst["eager_ratio"] >= 0.98))
    out.append("")
    out.append(verdict(first["compiled_ratio"] >= 1.3, "decode >= 1.3x transformers at batch 1 "
                       "(static cache + compiled decode kernel)", f"{first['compiled_ratio']:.2f}x in this run."))
    out.append(f"\nWarming up compile_decode (compiling the kernel) added {first['compile_warmup_s']:.1f} s at "
               "batch 1, once per process and row-count class (1 row, several rows).")
    return "\n".join(out)
