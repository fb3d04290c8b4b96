"""Qwen3 decoder: GQA with per-head q/k RMSNorm, RoPE, SwiGLU MLP, tied or untied LM head.

Attention runs in one of three ways, chosen by the `AttnContext` built by the caller:
  dense   (B, L) batch, causal, optional padding mask            -- parity checks, simple use
  packed  (1, T) several sequences back to back (cu_seqlens)      -- training and batched prefill
  cache   new tokens appended to per-slot KV caches (slots)       -- generation
Module names follow the released checkpoints (`llm.model.layers.N.self_attn.q_proj`, `llm.lm_head`).
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class AttnContext:
    mask: torch.Tensor | None = None        # dense: (B, 1, L, L) bool, None = plain causal
    cu_seqlens: torch.Tensor | None = None  # packed: (S+1,) offsets into the single row of x
    cache: KVCache | None = None            # cache mode: append to these slots
    slots: list[int] | None = None          # one slot per packed segment (or per batch row when decoding)


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
        q = self.q_norm(self.q_proj(x).view(b, n, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, n, self.n_kv, self.head_dim))
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, cos[:, :, None], sin[:, :, None]), apply_rotary(k, cos[:, :, None], sin[:, :, None])
        if ctx.cache is not None:
            out = self._cached(q, k, v, ctx, layer)
        elif ctx.cu_seqlens is not None:
            out = varlen_attention(q[0], k[0], v[0], ctx.cu_seqlens, causal=True)[None]
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                                 enable_gqa=self.n_heads != self.n_kv).transpose(1, 2)
        return self.o_proj(out.reshape(b, n, -1))

    def _cached(self, q, k, v, ctx: AttnContext, layer: int) -> torch.Tensor:
        cache, slots = ctx.cache, ctx.slots
        kc, vc = cache.k[layer], cache.v[layer]
        gqa = self.n_heads != self.n_kv
        if ctx.cu_seqlens is None:  # decode: one new token per batch row, each row its own slot
            pos = cache.lengths[slots]
            rows = torch.tensor(slots, device=kc.device)
            kc[rows, :, pos.to(kc.device)] = k[:, 0]
            vc[rows, :, pos.to(kc.device)] = v[:, 0]
            span = int(pos.max()) + 1
            # Attend over a *view* of the slot range [lo, hi) instead of gathering rows (a gather copies the
            # whole cache every step); free slots inside the range get a dummy query whose output is dropped.
            lo, hi = min(slots), max(slots) + 1
            keys, values = kc[lo:hi, :, :span], vc[lo:hi, :, :span]
            index = rows - lo
            q_rows = q.new_zeros(hi - lo, *q.shape[1:]).index_copy(0, index, q) if hi - lo != len(slots) or \
                slots != sorted(slots) else q
            lengths = torch.zeros(hi - lo, dtype=torch.long, device=kc.device).index_copy(0, index, pos.to(kc.device))
            mask = (torch.arange(span, device=kc.device)[None, :] <= lengths[:, None])[:, None, None, :]
            out = F.scaled_dot_product_attention(q_rows.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=gqa)
            out = out.transpose(1, 2)
            return out if q_rows is q else out[index]
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ctx: AttnContext, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


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
