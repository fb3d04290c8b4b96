"""Weight-only int8 quantization of the LLM for faster CPU decoding.

    from ovis25.quant import quantize
    quantize(model, "int8")                      # in place; returns the model
    quantize(model, "int8", backend="torchao")   # torchao's Int8WeightOnlyConfig instead (extra `quant`)

Every linear layer of the LLM (attention, MLP and the LM head; the vision encoder is left alone) keeps its
weight as int8 with one float scale per output channel (symmetric, absmax / 127). Decoding streams every
weight once per step, so a quarter of the bytes is what makes it faster; activations stay in float.

The built-in backend ("torch") needs nothing beyond PyTorch: up to `SMALL_BATCH_ROWS` rows on CPU (decode
steps) go through the torch.compile'd matrix-vector kernel of `model.llm`, which reads the int8 weight
directly; larger inputs (prefill) dequantize the weight and use a normal matmul. torchao (0.18 here) is
supported for comparison: on CPU its weight-only int8 linear dequantizes the whole weight on every call
(eager) or lowers to aten's `_weight_int8pack_mm` (compiled), and both are slower than float32 on this
machine (BENCHMARKS.md), so it is not the default.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model.llm import SMALL_BATCH_ROWS, compiled_gemv

MODES = ("int8",)
BACKENDS = ("torch", "torchao")


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale (+ bias), q int8 (out, in), scale float32 (out,)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 compile: bool = True):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.compile = compile

    @classmethod
    def from_linear(cls, linear: nn.Linear, compile: bool = True) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qweight, scale, bias, compile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.compile and rows <= SMALL_BATCH_ROWS and x.device.type == "cpu":
            y = compiled_gemv(x.reshape(rows, x.shape[-1]), self.qweight).view(*x.shape[:-1], -1)
        else:  # many rows: the matmul is compute bound, converting the weight first costs little
            y = F.linear(x, self.qweight.to(x.dtype))
        y = y * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def llm_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear of the LLM, the LM head included."""
    llm = model.llm if hasattr(model, "llm") else model
    return [(parent, name, child) for parent in llm.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


def quantize(model: nn.Module, mode: str = "int8", backend: str = "torch", compile: bool = True) -> nn.Module:
    """Quantize the LLM's linear layers in place (an `Ovis` or a bare `Qwen3ForCausalLM`); returns the model.

    For inference only: the weights become buffers (int8 + scales) and no longer train. A tied LM head gets
    its own int8 copy; the embedding table stays in float. compile=False keeps the built-in backend free of
    torch.compile (then every call dequantizes, which is slower than float on CPU: use it for checks only).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    layers = llm_linears(model)
    if backend == "torchao":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as e:
            raise ImportError("backend='torchao' needs torchao: pip install 'ovis25[quant]'") from e
        targets = {id(layer) for _, _, layer in layers}
        llm = model.llm if hasattr(model, "llm") else model
        if llm.lm_head.weight is llm.model.embed_tokens.weight:  # untie: the embedding lookup stays float
            llm.lm_head.weight = nn.Parameter(llm.lm_head.weight.detach().clone(), requires_grad=False)
        quantize_(llm, Int8WeightOnlyConfig(), filter_fn=lambda m, _: id(m) in targets)
        return model
    for parent, name, layer in layers:
        setattr(parent, name, Int8Linear.from_linear(layer, compile))
    return model
