"""Weight-only quantized decoding: speed and deviation against float32 on the same random weights.

Model: the LLM of the llm section (Qwen3-0.6B shape, 28 layers; --quick: 4), batch 1. Variants:
  float32, default engine / float32 with compile_decode=True;
  int8 (`ovis25.quant.quantize(model, "int8")`): per-output-channel symmetric int8 weights for every LLM
       linear layer and the LM head, read directly by the compiled decode kernel;
  int8 torchao (`backend="torchao"`, torchao's Int8WeightOnlyConfig), when torchao is installed;
  int4 torchao (its prototype CPU Int4 weight-only config, group size 128), measured only, not offered.
Deviation: teacher-forced logits over one random prompt vs float32 (max |difference|, relative to the
largest |logit|, and how often the top-1 id agrees), and greedy continuations (leading ids equal to float32's).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import warnings

import torch

from common import SMOKE_LLM, PeakMemory, fixture_tokenizer, pick, qwen3_pair, table
from llm import decode_rates, engine_with_requests, weight_bytes
from ovis25.generation import Engine, GenerationConfig
from ovis25.quant import quantize

NO_EOS = (10**9,)


def int4_torchao(model):
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_
    llm = model.llm
    llm.lm_head.weight = torch.nn.Parameter(llm.lm_head.weight.detach().clone(), requires_grad=False)  # untie
    quantize_(llm, PrototypeInt4WeightOnlyConfig(group_size=128))
    return model


def variants(base, with_torchao: bool) -> dict:
    """name -> (model, engine options)."""
    out = {"float32": (base, {}), "float32 compile_decode": (base, {"compile_decode": True}),
           "int8 (ours)": (quantize(copy.deepcopy(base), "int8"), {})}
    if with_torchao:
        out["int8 torchao"] = (quantize(copy.deepcopy(base), "int8", backend="torchao"), {})
        try:  # a CPU-only prototype config
            if base.vte.weight.device.type == "cpu":
                out["int4 torchao (prototype)"] = (int4_torchao(copy.deepcopy(base)), {})
        except Exception as e:  # a prototype API: report, do not fail the run
            logging.warning("int4 torchao unavailable: %s", e)
    return out


@torch.inference_mode()
def greedy(model, tokenizer, prompt: torch.Tensor, n: int, **options) -> list[int]:
    engine = Engine(model, tokenizer, max_batch_size=1, max_len=len(prompt) + n + 8, **options)
    return engine.generate([{"input_ids": prompt}], GenerationConfig(max_new_tokens=n, eos_token_ids=NO_EOS))[0].token_ids


def run(mode: str) -> dict:
    with_torchao = importlib.util.find_spec("torchao") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, base = qwen3_pair(pick(mode, 28, 4, 1), hf=False, **pick(mode, {}, {}, SMOKE_LLM))
        models = variants(base, with_torchao)
    tokenizer = fixture_tokenizer()
    vocab = base.config.llm_config.vocab_size
    prompt_len, steps, greedy_n = pick(mode, (64, 16, 24), (32, 12, 16), (8, 3, 4))
    torch.manual_seed(1)
    prompt = torch.randint(0, vocab, (1, prompt_len))
    with torch.inference_mode():
        ref_logits = base(prompt).logits[0]
    ref_greedy = greedy(base, tokenizer, prompt[0], greedy_n)
    rows = []
    with PeakMemory() as mem:
        engines = {}
        for name, (model, options) in models.items():
            engines[name], _ = engine_with_requests(model, tokenizer, prompt, steps, **options)
        with torch.inference_mode():
            tok_s = decode_rates({name: e.step for name, e in engines.items()}, 1, steps)
    for name, (model, options) in models.items():
        with torch.inference_mode():
            logits = model(prompt).logits[0].float()  # prefill path: the same for both float32 variants
        ids = greedy(model, tokenizer, prompt[0], greedy_n, **options)
        same = next((i for i, (a, b) in enumerate(zip(ids, ref_greedy)) if a != b), len(ids))
        diff = (logits - ref_logits).abs().max().item()
        rows.append({"variant": name, "weight_gb": weight_bytes(model.llm) / 1e9, "tok_s": tok_s[name],
                     "speedup": tok_s[name] / tok_s["float32"], "max_logit_diff": diff,
                     "rel_logit_diff": diff / ref_logits.abs().max().item(),
                     "top1_agree": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                     "greedy_same": f"{same}/{len(ids)}", **mem.columns()})
    return {"config": {"layers": base.config.llm_config.num_hidden_layers, "prompt_len": prompt_len,
                       "steps": steps, "torchao": with_torchao}, "rows": rows}


def render(result: dict) -> str:
    c = result["config"]
    out = [f"{c['layers']} layers, batch 1, {c['steps']} decode steps per variant in turn; deviation over a "
           f"{c['prompt_len']}-token random prompt.", "",
           table(result["rows"], {"variant": "variant", "weight_gb": "weights GB", "tok_s": "decode tok/s",
                                  "speedup": "speedup vs float32", "max_logit_diff": "max logit diff",
                                  "rel_logit_diff": "/ max logit", "top1_agree": "top-1 agreement",
                                  "greedy_same": "greedy ids equal", "peak_rss_gb": "peak RSS GB (all variants)"})]
    if not c["torchao"]:
        out.append("\ntorchao is not installed (`pip install 'ovis25[quant]'`): its rows are missing.")
    return "\n".join(out)
