"""Weight-only int8 quantization (ovis25.quant): the int8 layer computes what it should, quantized logits stay
close to float32's on the fixture models, and greedy answers equal the fixture's except at near-ties."""
import copy
import importlib.util
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

from conftest import FIXTURES, cases, load_case, manifest, requires_fixtures
import ovis25
from ovis25.generation import Engine, GenerationConfig
from ovis25.quant import Int8Linear, quantize

CHAT_CASES = cases("chat")
MODELS = sorted({e["model"] for e in CHAT_CASES})
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
BACKENDS = ["torch", pytest.param("torchao", marks=pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao not installed"))]

# Max |quantized - float32| logit over every position of every fixture prompt, as a fraction of the largest
# |float32 logit|. Measured: 6.6% (ours) and 5% (torchao) on the tiny fixture models, whose rows of 64-128
# weights make per-channel int8 coarser than on real model widths.
REL_TOL = 0.10
MIN_EXACT = 0.6  # of the fixture chat cases give token-identical greedy answers (measured: 19/26 and 22/26)


@lru_cache(maxsize=None)
def models(name: str, backend: str) -> tuple:
    chat = ovis25.Chat.from_pretrained(FIXTURES / manifest()["models"][name]["dir"])
    return chat, quantize(copy.deepcopy(chat.model), "int8", backend=backend)


def visual_inputs(tensors: dict) -> tuple:
    return tensors.get("pixel_values"), tensors.get("grid_thws")


@pytest.mark.parametrize("rows", [1, 3, 40])  # the compiled decode kernel (<= 8 rows) and the matmul path
def test_int8_linear_is_the_dequantized_matmul(rows, single_thread):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    q = Int8Linear.from_linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (40,)
    w = linear.weight.detach()
    assert ((q.qweight.float() * q.scale[:, None] - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        expected = x @ (q.qweight.float() * q.scale[:, None]).T + linear.bias
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q(x[:, None]), expected[:, None], rtol=1e-5, atol=1e-5)  # leading dims kept


@requires_fixtures
def test_quantize_replaces_every_llm_linear_and_validates():
    chat, _ = models(MODELS[0], "torch")
    model = quantize(copy.deepcopy(chat.model), "int8")
    llm_linears = [m for m in model.llm.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert llm_linears and all(isinstance(m, Int8Linear) for m in llm_linears)
    assert model.llm.model.embed_tokens.weight.dtype == torch.float32  # the lookup table stays float
    assert any(isinstance(m, nn.Linear) for m in model.visual_tokenizer.modules())  # the ViT is left alone
    with pytest.raises(ValueError, match="mode"):
        quantize(copy.deepcopy(chat.model), "int3")
    with pytest.raises(ValueError, match="backend"):
        quantize(copy.deepcopy(chat.model), "int8", backend="bitsandbytes")


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@requires_fixtures
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_quantized_logits_and_greedy_answers(name, backend, single_thread):
    chat, quantized = models(name, backend)
    entries = [e for e in CHAT_CASES if e["model"] == name]
    exact = 0
    for entry in entries:
        case, tensors = load_case(entry)
        ids = tensors["input_ids"].view(1, -1)
        with torch.inference_mode():
            ref = chat.model(ids, *visual_inputs(tensors)).logits
            got = quantized(ids, *visual_inputs(tensors)).logits
        assert (got - ref).abs().max() <= REL_TOL * ref.abs().max(), entry["path"]

        call = case["call"]
        engine = Engine(quantized, chat.processor.tokenizer, max_batch_size=1, max_len=512)
        config = GenerationConfig(max_new_tokens=call["max_new_tokens"], enable_thinking=call["enable_thinking"],
                                  thinking_budget=call.get("thinking_budget"))
        res = engine.generate([{"input_ids": tensors["input_ids"], "pixel_values": tensors.get("pixel_values"),
                                "grid_thws": tensors.get("grid_thws")}], config)[0]
        expected = case["generated_ids"]
        if res.token_ids == expected:
            exact += 1
            continue
        # A different answer is fine only where float32 itself nearly tied: at the first differing step its top
        # two logits must be closer than twice the quantization error there.
        k = first_difference(res.token_ids, expected)
        assert k < min(len(res.token_ids), len(expected)), f"{entry['path']}: one answer is a prefix of the other"
        prefix = torch.cat([ids[0], torch.tensor(expected[:k], dtype=torch.long)])[None]
        with torch.inference_mode():
            ref = chat.model(prefix, *visual_inputs(tensors), logits_to_keep=1).logits[0, -1]
            got = quantized(prefix, *visual_inputs(tensors), logits_to_keep=1).logits[0, -1].float()
        top2 = ref.topk(2).values
        assert top2[0] - top2[1] <= 2 * (got - ref).abs().max(), f"{entry['path']}: diverged at step {k} without a near-tie"
    assert exact >= MIN_EXACT * len(entries)
