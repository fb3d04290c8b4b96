"""SigLIP2 NaViT vision encoder and the Ovis visual tokenizer.

Images of any size are turned into patch rows (see processing/image.py for the row order: frame, then
2x2 groups row-major, then the 4 patches of a group) and packed into one flat sequence. Attention stays
inside each frame (full blocks) or inside each window of groups (window blocks). The visual tokenizer
concatenates each 2x2 group, projects it to `visual_vocab_size - 4` logits and softmaxes: every visual
token is a probability distribution over the visual vocabulary.

Module names follow the released checkpoints (`vit.vision_model.embeddings...`, `head.0`, `head.1`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from .attention import apply_rotary, varlen_attention


def _grid_list(grid_thws: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in row) for row in grid_thws.tolist()]


class VisionLayout:
    """Index bookkeeping for one packed batch of images/frames, computed once per forward.

    All per-patch tables are in pixel_values row order. `window_order` permutes patches so that each
    attention window is contiguous; `frame_cu` / `window_cu` are segment offsets in that order.
    """

    def __init__(self, grid_thws: torch.Tensor, config: VisionConfig, device: torch.device):
        s = config.hidden_stride
        m = config.window_groups
        rows, cols, order, frame_lens, window_lens = [], [], [], [], []
        offset = 0  # in groups
        for t, h, w in _grid_list(grid_thws):
            gh, gw = h // s, w // s
            # grid row/column of each patch in group order
            gi, gj, di, dj = torch.meshgrid(torch.arange(gh), torch.arange(gw), torch.arange(s), torch.arange(s),
                                            indexing="ij")
            r, c = (gi * s + di).reshape(-1), (gj * s + dj).reshape(-1)
            group_ids = torch.arange(gh * gw).view(gh, gw)
            frames = t // config.temporal_patch_size
            for _ in range(frames):
                rows.append(r)
                cols.append(c)
                frame_lens.append(h * w)
                for wi in range(0, gh, m):
                    for wj in range(0, gw, m):
                        win = group_ids[wi:wi + m, wj:wj + m].reshape(-1)
                        order.append(win + offset)
                        window_lens.append(win.numel() * s * s)
                offset += gh * gw
        self.rows = torch.cat(rows).to(device)
        self.cols = torch.cat(cols).to(device)
        self.group_window_order = torch.cat(order)
        patch_order = (self.group_window_order[:, None] * s * s + torch.arange(s * s)).reshape(-1)
        self.window_order = patch_order.to(device)
        self.window_restore = torch.argsort(self.window_order)
        self.frame_cu = F.pad(torch.tensor(frame_lens).cumsum(0), (1, 0)).to(torch.int32)
        self.window_cu = F.pad(torch.tensor(window_lens).cumsum(0), (1, 0)).to(torch.int32)
        self.num_patches = int(self.frame_cu[-1])


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        c, p, tp = config.num_channels, config.patch_size, config.temporal_patch_size
        self.patch_embedding = (nn.Conv2d(c, config.hidden_size, p, p) if tp == 1
                                else nn.Conv3d(c, config.hidden_size, (tp, p, p), (tp, p, p)))
        self.grid_side = config.image_size // p
        self.position_embedding = nn.Embedding(self.grid_side ** 2, config.hidden_size)

    def interpolated_positions(self, h: int, w: int) -> torch.Tensor:
        """Learned SxS table resized (bicubic, no antialias) to h x w, in 2x2 group order: (h*w, D)."""
        s, n = self.config.hidden_stride, self.grid_side
        table = self.position_embedding.weight.view(n, n, -1).permute(2, 0, 1)[None]  # (1, D, n, n)
        grid = F.interpolate(table.float(), size=(h, w), mode="bicubic", align_corners=False)[0]  # (D, h, w)
        grid = grid.view(-1, h // s, s, w // s, s).permute(1, 3, 2, 4, 0)  # (h/s, w/s, s, s, D)
        return grid.reshape(h * w, -1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        # a stride-p conv over non-overlapping patches is a matmul over the channel-major patch row
        weight = self.patch_embedding.weight
        x = F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1), self.patch_embedding.bias)
        pos = {}
        chunks = []
        for t, h, w in _grid_list(grid_thws):
            if (h, w) not in pos:
                pos[(h, w)] = self.interpolated_positions(h, w)
            chunks.append(pos[(h, w)].repeat(t // self.config.temporal_patch_size, 1))
        return x + torch.cat(chunks)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (proj(x).view(n, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, causal=False)
        return self.out_proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        # Saved in checkpoints but never applied by the visual tokenizer (see the fixtures README).
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """The ViT: returns the last block's hidden states (N, D) in pixel_values row order."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config)

    def rotary(self, layout: VisionLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch angles [row * f, col * f] (N, head_dim/2) as cos/sin of shape (N, 1, head_dim)."""
        quarter = self.config.head_dim // 4
        inv_freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=layout.rows.device) / quarter)
        angles = torch.cat([layout.rows[:, None] * inv_freq, layout.cols[:, None] * inv_freq], dim=-1)
        emb = torch.cat([angles, angles], dim=-1)[:, None, :]
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor,
                output_hidden_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        layout = VisionLayout(grid_thws, self.config, pixel_values.device)
        if pixel_values.shape[0] != layout.num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thws describe "
                             f"{layout.num_patches} patches")
        x = self.vision_model.embeddings(pixel_values, grid_thws)
        cos, sin = self.rotary(layout)
        full = self.config.full_attention_blocks
        windowed = len(full) < self.config.num_hidden_layers
        if windowed:  # make every window contiguous; frames stay contiguous too
            x, cos, sin = x[layout.window_order], cos[layout.window_order], sin[layout.window_order]
        hidden = []
        for i, block in enumerate(self.vision_model.encoder.layers):
            x = block(x, cos, sin, layout.frame_cu if i in full else layout.window_cu)
            if output_hidden_states:
                hidden.append(x[layout.window_restore] if windowed else x)
        if windowed:
            x = x[layout.window_restore]
        return (x, hidden) if output_hidden_states else x


class VisualTokenizer(nn.Module):
    """ViT + head: pixel rows -> one probability distribution over the visual vocabulary per 2x2 group."""

    NUM_INDICATORS = 4

    def __init__(self, config: VisionConfig, visual_vocab_size: int):
        super().__init__()
        self.config = config
        self.vit = SiglipNaViT(config)
        in_dim = config.hidden_size * config.hidden_stride ** 2 * config.temporal_patch_size
        # LayerNorm keeps torch's default eps 1e-5, as the reference does (not the encoder's eps)
        self.head = nn.Sequential(nn.Linear(in_dim, visual_vocab_size - self.NUM_INDICATORS, bias=False),
                                  nn.LayerNorm(visual_vocab_size - self.NUM_INDICATORS))
        # optional `(vit, pixel_values, grid_thws) -> features` that may serve a frozen ViT's output from
        # memory (training sets `train.vision_cache.FrozenVisionCache` when the ViT does not train)
        self.feature_cache = None

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        atoms = features.reshape(-1, self.head[0].in_features)  # 4 consecutive rows form one atom
        return self.head(atoms)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        features = (self.vit(pixel_values, grid_thws) if self.feature_cache is None
                    else self.feature_cache(self.vit, pixel_values, grid_thws))
        logits = self.head_logits(features)
        probs = logits.float().softmax(dim=-1)
        return F.pad(probs, (0, self.NUM_INDICATORS))  # indicator columns never receive mass


def num_visual_atoms(grid_thws: torch.Tensor, hidden_stride: int, temporal_patch_size: int = 1) -> int:
    return int((grid_thws.prod(dim=-1) // (hidden_stride ** 2 * temporal_patch_size)).sum())

