"""Qwen3 decoder: GQA with per-head q/k RMSNorm, RoPE, SwiGLU MLP, tied or untied LM head.

Attention runs in one of three ways, chosen by the `AttnContext` built by the caller:
  dense   (B, L) batch, causal, optional padding mask            -- parity checks, simple use
  packed  (1, T) several sequences back to back (cu_seqlens)      -- training and batched prefill
  cache   new tokens appended to per-slot KV caches (slots)       -- generation
Module names follow the released checkpoints (`llm.model.layers.N.self_attn.q_proj`, `llm.lm_head`).

Decoding one token per sequence is memory bound: every step streams all weights through a matrix-vector
product. `small_batch_linear` is an opt-in (`AttnContext.linear`) compiled kernel for that case (see
BENCHMARKS.md for why and how much).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Qwen3Config
from .attention import apply_rotary, varlen_attention


class KVCache:
    """Static cache with one row ("slot") per live sequence: (slots, kv_heads, max_len, head_dim) per layer."""

    def __init__(self, config: Qwen3Config, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (num_slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.long)  # tokens stored per slot (kept on CPU)
        self.max_len = max_len

    def reset(self, slots: list[int]) -> None:
        self.lengths[slots] = 0


def apply_linear(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each module applied to x: the default way projections are run (see `AttnContext.linear`)."""
    return tuple(m(x) for m in modules)


# ---- small-batch linear: the decode step's matrix-vector products ----------------------------------------

SMALL_BATCH_ROWS = 8  # up to this many rows the reduction kernel beats MKL on CPU; above it MKL's GEMM wins


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T -> (M, N), any weight dtype (int8 is converted on the fly).

    Written as a reduction with the weight row outermost so that, compiled, it is one loop that streams each
    weight row once for all M rows: MKL's sgemv reaches ~55% of this CPU's memory bandwidth, this ~95%.
    Run eagerly (not compiling, e.g. after torch.compile gave up recompiling) it uses the plain matmul,
    since the reduction would materialise an (N, M, K) product.
    """
    if not torch.compiler.is_compiling():
        return F.linear(x, weight.to(x.dtype))
    return (weight.to(x.dtype)[:, None, :] * x).sum(-1).t().contiguous()


# Threads of the compiled kernel; None = half of torch's threads (at least one). A matrix-vector product is
# bound by memory bandwidth, which a few cores already saturate (one core reads ~38 GB/s on the 2-core
# development machine, as fast as two), and fewer threads keep one busy core from stalling every step.
DECODE_KERNEL_THREADS: int | None = None
_compiled_gemv: Callable | None = None


def have_cxx_compiler() -> bool:
    """torch.compile's CPU backend builds C++: without a compiler it fails on first use."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def compiled_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`gemv` through torch.compile, built on first use (seconds on CPU; needs a C++ compiler). Dynamic
    shapes: one compilation for one row and one for several serve every layer shape."""
    global _compiled_gemv
    if _compiled_gemv is None and x.device.type == "cpu" and not have_cxx_compiler():
        logging.getLogger(__name__).warning("no C++ compiler found (set CXX or install g++): the compiled decode "
                                            "kernel falls back to the plain matmul")
        _compiled_gemv = gemv  # eager: same results, MKL speed
    if _compiled_gemv is None:
        threads = DECODE_KERNEL_THREADS or max(1, torch.get_num_threads() // 2)
        _compiled_gemv = torch.compile(gemv, dynamic=True, options={"cpp.threads": threads})
    return _compiled_gemv(x, weight)


def small_batch_linear(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    """`apply_linear` for decode steps: plain nn.Linear layers applied to few rows on CPU go through the
    compiled `gemv`; anything else (more rows, GPU, quantized or LoRA-wrapped layers, autograd) is left
    to the modules."""
    rows = x.numel() // x.shape[-1]
    plain = all(type(m) is nn.Linear and type(m.weight.data) is torch.Tensor for m in modules)  # no subclasses
    if not plain or rows > SMALL_BATCH_ROWS or x.device.type != "cpu" \
            or (torch.is_grad_enabled() and (x.requires_grad or any(m.weight.requires_grad for m in modules))):
        return apply_linear(x, *modules)
    flat = x.reshape(rows, x.shape[-1])
    outs = []
    for m in modules:
        y = compiled_gemv(flat, m.weight.detach())  # a plain tensor: dynamo keeps parameter shapes static
        outs.append((y if m.bias is None else y + m.bias).view(*x.shape[:-1], y.shape[-1]))
    return tuple(outs)


@dataclass
class DecodePlan:
    """Where one decode step writes and reads in the cache; the same for every layer, so built once."""

    rows: torch.Tensor     # (B,) slot of each batch row
    pos: torch.Tensor      # (B,) cache position the new token is written to
    lo: int                # attention runs over the slot range [lo, hi) as a view of the cache
    index: torch.Tensor    # (B,) rows - lo
    scatter: bool          # batch rows are not exactly the slots lo..hi-1 in order: scatter q into the range
    mask: torch.Tensor     # (hi - lo, 1, 1, span) keys each row of the range may see

    @classmethod
    def build(cls, cache: "KVCache", slots: list[int], device: torch.device) -> "DecodePlan":
        pos = cache.lengths[slots].to(device)
        rows = torch.tensor(slots, device=device)
        span = int(cache.lengths[slots].max()) + 1
        # Attend over a *view* of the slot range [lo, hi) instead of gathering rows (a gather copies the
        # whole cache every step); free slots inside the range get a dummy query whose output is dropped.
        lo, hi = min(slots), max(slots) + 1
        index = rows - lo
        lengths = torch.zeros(hi - lo, dtype=torch.long, device=device).index_copy(0, index, pos)
        mask = (torch.arange(span, device=device)[None, :] <= lengths[:, None])[:, None, None, :]
        scatter = hi - lo != len(slots) or slots != sorted(slots)
        return cls(rows, pos, lo, index, scatter, mask)


@dataclass
class AttnContext:
    mask: torch.Tensor | None = None        # dense: (B, 1, L, L) bool, None = plain causal
    cu_seqlens: torch.Tensor | None = None  # packed: (S+1,) offsets into the single row of x
    cache: KVCache | None = None            # cache mode: append to these slots
    slots: list[int] | None = None          # one slot per packed segment (or per batch row when decoding)
    linear: Callable[..., tuple[torch.Tensor, ...]] = apply_linear  # how projections are applied
    plan: DecodePlan | None = field(default=None, repr=False)  # filled in by the model for a decode step


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (*position_ids.shape, head_dim), computed in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext,
                layer: int) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = ctx.linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = self.q_norm(q.view(b, n, self.n_heads, self.head_dim))
        k = self.k_norm(k.view(b, n, self.n_kv, self.head_dim))
        v = v.view(b, n, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, cos[:, :, None], sin[:, :, None]), apply_rotary(k, cos[:, :, None], sin[:, :, None])
        if ctx.cache is not None:
            out = self._cached(q, k, v, ctx, layer)
        elif ctx.cu_seqlens is not None:
            out = varlen_attention(q[0], k[0], v[0], ctx.cu_seqlens, causal=True)[None]
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                                 enable_gqa=self.n_heads != self.n_kv).transpose(1, 2)
        return ctx.linear(out.reshape(b, n, -1), self.o_proj)[0]

    def _cached(self, q, k, v, ctx: AttnContext, layer: int) -> torch.Tensor:
        cache, slots = ctx.cache, ctx.slots
        kc, vc = cache.k[layer], cache.v[layer]
        gqa = self.n_heads != self.n_kv
        if ctx.cu_seqlens is None:  # decode: one new token per batch row, each row its own slot
            plan = ctx.plan or DecodePlan.build(cache, slots, kc.device)
            kc[plan.rows, :, plan.pos] = k[:, 0]
            vc[plan.rows, :, plan.pos] = v[:, 0]
            hi, span = plan.lo + plan.mask.shape[0], plan.mask.shape[-1]
            keys, values = kc[plan.lo:hi, :, :span], vc[plan.lo:hi, :, :span]
            q_rows = q.new_zeros(hi - plan.lo, *q.shape[1:]).index_copy(0, plan.index, q) if plan.scatter else q
            out = F.scaled_dot_product_attention(q_rows.transpose(1, 2), keys, values, attn_mask=plan.mask,
                                                 enable_gqa=gqa)
            out = out.transpose(1, 2)
            return out[plan.index] if plan.scatter else out
        # packed append: segment i goes to slot slots[i] after the tokens that slot already holds
        starts = ctx.cu_seqlens.tolist()
        prefix = cache.lengths[slots].tolist()
        if not any(prefix):  # fresh slots: attention only within the new tokens
            out = varlen_attention(q[0], k[0], v[0], ctx.cu_seqlens, causal=True)[None]
        else:
            out = torch.empty_like(q)
        for i, slot in enumerate(slots):
            s, e, p = starts[i], starts[i + 1], prefix[i]
            kc[slot, :, p:p + e - s] = k[0, s:e].transpose(0, 1)
            vc[slot, :, p:p + e - s] = v[0, s:e].transpose(0, 1)
            if any(prefix):
                n = e - s
                mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(diagonal=p)
                o = F.scaled_dot_product_attention(q[0, s:e].transpose(0, 1)[None], kc[slot:slot + 1, :, :p + n],
                                                   vc[slot:slot + 1, :, :p + n], attn_mask=mask, enable_gqa=gqa)
                out[0, s:e] = o[0].transpose(0, 1)
        return out


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, linear: Callable = apply_linear) -> torch.Tensor:
        gate, up = linear(x, self.gate_proj, self.up_proj)
        return linear(F.silu(gate) * up, self.down_proj)[0]


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ctx: AttnContext, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.linear)


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, ctx: AttnContext | None = None,
                output_hidden_states: bool = False):
        """inputs_embeds (B, L, H), position_ids (B, L) -> final-norm hidden states (B, L, H)."""
        ctx = ctx or AttnContext()
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        if ctx.cache is not None and ctx.cu_seqlens is None:  # decode: one plan for all layers
            ctx = replace(ctx, plan=DecodePlan.build(ctx.cache, ctx.slots, inputs_embeds.device))
        x = inputs_embeds
        hidden = [x]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, ctx, i)
            hidden.append(x)
        x = self.model.norm(x)
        if ctx.cache is not None:  # every layer has written; advance the slots
            n = [1] * len(ctx.slots) if ctx.cu_seqlens is None else (ctx.cu_seqlens[1:] - ctx.cu_seqlens[:-1]).tolist()
            ctx.cache.lengths[ctx.slots] += torch.tensor(n)
        if output_hidden_states:
            hidden[-1] = x  # as HF: the last entry is the final-norm output
            return x, hidden
        return x
