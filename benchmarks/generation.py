"""End to end: an image question with thinking on, from a PIL image and a chat message to streamed tokens,
and the thinking budget done in one pass over the KV cache vs the reference's re-prefill.

Model: Ovis2.5-2B-shaped with random weights -- SigLIP2-so400m ViT (27 x 1152), visual vocabulary 65536,
Qwen3-0.6B-shaped LLM (28 x 1024, vocab 151936), float32 (--quick: 4 ViT blocks, 4 LLM layers, visual
vocabulary 4096). Tokenizer and chat template of the test fixture. One 448x448 image, so 196 visual tokens.
  TTFT: processor (resize, patchify, template) + one prefill (ViT, visual head, LLM) + first token;
  tokens/s: the decode steps after the first token, default engine and compile_decode=True;
  thinking budget: our one pass (the early-stop text is appended to the live cache) vs what the reference
  `chat()` does (phase 1, then a fresh prefill of image + prompt + phase 1 + early-stop text, then phase 2).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from common import FIXTURE_TOKENIZER, QWEN3_06B, SMOKE_LLM, PeakMemory, device, pick, sync, table
from ovis25.config import OvisConfig, Qwen3Config, VisionConfig
from ovis25.generation import EARLY_STOP_TEXT, Engine, GenerationConfig
from ovis25.model import Ovis
from ovis25.processing import Processor

NO_EOS = (10**9,)
QUESTION = "What is in this picture? Describe the objects and their colours."


def build(mode: str) -> Ovis:
    torch.manual_seed(0)
    vit = pick(mode, VisionConfig(), VisionConfig(num_hidden_layers=4),
               VisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    llm = Qwen3Config(**pick(mode, QWEN3_06B, dict(QWEN3_06B, num_hidden_layers=4),
                             dict(QWEN3_06B, num_hidden_layers=1, **SMOKE_LLM)))
    return Ovis(OvisConfig(vit, llm, pick(mode, 65536, 4096, 132))).eval().to(device())


def run_request(engine: Engine, processor: Processor, image: Image.Image, config: GenerationConfig) -> dict:
    """(TTFT s, decode tokens/s) for one request, preprocessing included."""
    sync()
    t0 = time.perf_counter()
    inputs = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": QUESTION}]}], enable_thinking=True)
    engine.add_request(inputs["input_ids"], inputs["pixel_values"], inputs["grid_thws"], config)
    engine.step()
    sync()
    ttft = time.perf_counter() - t0
    n = 0
    while engine.has_unfinished():
        n += len(engine.step())
    sync()
    return {"prompt_tokens": inputs["input_ids"].shape[1], "ttft_s": ttft,
            "decode_tok_s": n / (time.perf_counter() - t0 - ttft)}


def thinking_budget(engine: Engine, processor: Processor, image: Image.Image, budget: int, answer: int) -> dict:
    """Thinking cut after `budget` tokens, then `answer` tokens of answer after the early-stop text."""
    early = processor.tokenizer.encode(EARLY_STOP_TEXT)
    new = budget + len(early) + answer
    inputs = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": QUESTION}]}], enable_thinking=True)
    prompt = {"input_ids": inputs["input_ids"][0], "pixel_values": inputs["pixel_values"], "grid_thws": inputs["grid_thws"]}
    before = engine.stats.prefill_calls
    sync()
    t0 = time.perf_counter()
    engine.generate([prompt], GenerationConfig(max_new_tokens=new, eos_token_ids=NO_EOS, enable_thinking=True,
                                               thinking_budget=budget))
    sync()
    one_pass, prefills = time.perf_counter() - t0, engine.stats.prefill_calls - before
    t0 = time.perf_counter()  # the reference: phase 1, fresh prefill of everything so far + early-stop ids, phase 2
    phase1 = engine.generate([prompt], GenerationConfig(max_new_tokens=budget, eos_token_ids=NO_EOS))[0]
    second = dict(prompt, input_ids=torch.cat([prompt["input_ids"], torch.tensor(phase1.token_ids + early)]))
    engine.generate([second], GenerationConfig(max_new_tokens=answer, eos_token_ids=NO_EOS))
    sync()
    reprefill = time.perf_counter() - t0
    return {"budget": budget, "max_new_tokens": new, "one_pass_s": one_pass, "reprefill_s": reprefill,
            "speedup": reprefill / one_pass, "prefills_one_pass": prefills}


@torch.inference_mode()
def run(mode: str) -> dict:
    model = build(mode)
    processor = Processor.from_pretrained(FIXTURE_TOKENIZER)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    new = pick(mode, 64, 16, 4)
    rows = []
    for name, compiled in (("ours", False), ("ours compile_decode", True)):
        engine = Engine(model, processor.tokenizer, max_batch_size=1, max_len=1024, compile_decode=compiled)
        engine.generate([{"input_ids": processor.tokenizer.encode("warm up")}],  # compiles the decode kernel
                        GenerationConfig(max_new_tokens=3, eos_token_ids=NO_EOS))
        with PeakMemory() as mem:
            row = run_request(engine, processor, image, GenerationConfig(max_new_tokens=new, eos_token_ids=NO_EOS,
                                                                         enable_thinking=True))
        rows.append({"engine": name, **row, **mem.columns()})
    budget, answer = pick(mode, (32, 32), (8, 8), (2, 2))
    engine = Engine(model, processor.tokenizer, max_batch_size=1, max_len=1024)
    with PeakMemory() as mem:
        think = thinking_budget(engine, processor, image, budget, answer)
    think.update(mem.columns())
    params = sum(p.numel() for p in model.parameters())
    return {"config": {"params": params, "new_tokens": new, "image": "448x448"}, "rows": rows, "thinking": think}


def render(result: dict) -> str:
    c = result["config"]
    out = [f"{c['params'] / 1e9:.2f}B parameters; one {c['image']} image; {c['new_tokens']} new tokens, thinking on.",
           "", table(result["rows"], {"engine": "engine", "prompt_tokens": "prompt tokens", "ttft_s": "TTFT s",
                                      "decode_tok_s": "decode tok/s", "peak_rss_gb": "peak RSS GB"}), "",
           "Thinking budget, same image question:", "",
           table([result["thinking"]], {"budget": "budget", "max_new_tokens": "max new tokens",
                                        "one_pass_s": "one pass s", "reprefill_s": "re-prefill s",
                                        "speedup": "speedup", "prefills_one_pass": "prefills (one pass)",
                                        "peak_rss_gb": "peak RSS GB"})]
    return "\n".join(out)
