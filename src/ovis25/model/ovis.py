"""Ovis2.5: visual tokenizer + visual embedding table (VET) + Qwen3, merged at placeholder positions.

Prompt ids use the official negative placeholders: -300 for each visual atom and -301..-304 for the
image start/end and video start/end indicators (the last four VET rows). Text ids (>= 0) use the LLM's
embedding table. `<image>` (-200) / `<video>` (-201) must have been expanded by the processor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import OvisConfig
from ..constants import IGNORE_ID, IMAGE_TOKEN_ID, INDICATOR_IDS, VIDEO_TOKEN_ID, VISUAL_ATOM_ID
from .llm import AttnContext, Qwen3ForCausalLM
from .vision import VisualTokenizer, num_visual_atoms



@dataclass
class OvisOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    token_logps: torch.Tensor | None = None  # with `targets`: log p(target) at each supervised position, in order


class Ovis(nn.Module):
    def __init__(self, config: OvisConfig):
        super().__init__()
        self.config = config
        self.visual_tokenizer = VisualTokenizer(config.vit_config, config.visual_vocab_size)
        self.vte = nn.Embedding(config.visual_vocab_size, config.llm_config.hidden_size)
        self.llm = Qwen3ForCausalLM(config.llm_config)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: OvisConfig | str | Path | dict) -> "Ovis":
        """A model with freshly initialised weights (no weights read); works under torch.device('meta')."""
        if isinstance(config, dict):
            config = OvisConfig.from_dict(config)
        elif not isinstance(config, OvisConfig):
            config = OvisConfig.from_json(config)
        return cls(config)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "Ovis":
        from ..checkpoint import load_model
        return load_model(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30, processor=None,
                        generation_config: dict | None = None) -> None:
        """Write the official layout; pass the Processor to include tokenizer/template/preprocessor files."""
        from ..checkpoint import save_model
        save_model(self, path, max_shard_bytes=max_shard_bytes, processor=processor,
                   generation_config=generation_config)

    # ---- embeddings ---------------------------------------------------------------------------
    def visual_embeddings(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        """Soft VET lookup: (atoms, V) probabilities @ (V, H) table."""
        probs = self.visual_tokenizer(pixel_values, grid_thws)
        return probs.to(self.vte.weight.dtype) @ self.vte.weight

    def blank_visual_embeddings(self) -> torch.Tensor:
        """Visual embeddings of the smallest blank image (one visual token)."""
        vc = self.config.vit_config
        s, width = vc.hidden_stride, self.visual_tokenizer.vit.vision_model.embeddings.patch_embedding.weight[0].numel()
        grid = torch.tensor([[vc.temporal_patch_size, s, s]])
        pixels = torch.zeros(s * s, width, device=self.vte.weight.device, dtype=self.vte.weight.dtype)
        return self.visual_embeddings(pixels, grid)

    def merge_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                         grid_thws: torch.Tensor | None = None,
                         visual_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with visual atoms and indicators put in place, without in-place ops."""
        if ((input_ids == IMAGE_TOKEN_ID) | (input_ids == VIDEO_TOKEN_ID)).any():
            raise ValueError("input_ids still contain <image>/<video> placeholders (-200/-201); "
                             "expand them with the Processor first")
        bad = (input_ids < 0) & (input_ids != VISUAL_ATOM_ID) & ((input_ids > INDICATOR_IDS[0]) | (input_ids < INDICATOR_IDS[-1]))
        if bad.any():
            raise ValueError(f"input_ids contain unknown negative id(s) {sorted(set(input_ids[bad].tolist()))}")
        vocab = self.config.llm_config.vocab_size
        if (input_ids >= vocab).any():
            raise ValueError(f"input_ids contain id {int(input_ids.max())} >= LLM vocab size {vocab}")
        embeds = self.llm.model.embed_tokens(input_ids.clamp(min=0))
        atom_mask = input_ids == VISUAL_ATOM_ID
        n_atoms = int(atom_mask.sum())
        if visual_embeds is None and pixel_values is not None:
            if grid_thws is None:
                raise ValueError("pixel_values given without grid_thws")
            visual_embeds = self.visual_embeddings(pixel_values, grid_thws)
        n_visual = 0 if visual_embeds is None else visual_embeds.shape[0]
        if n_atoms != n_visual:
            raise ValueError(f"input_ids have {n_atoms} visual atom positions (-300) but the images/videos "
                             f"give {n_visual} visual tokens")
        if n_atoms:
            embeds = embeds.masked_scatter(atom_mask[..., None], visual_embeds.to(embeds.dtype))
        indicator_mask = input_ids <= INDICATOR_IDS[0]
        if indicator_mask.any():
            first = self.config.visual_vocab_size - len(INDICATOR_IDS)
            rows = F.embedding((INDICATOR_IDS[0] - input_ids).clamp(0, 3) + first, self.vte.weight)
            embeds = torch.where(indicator_mask[..., None], rows.to(embeds.dtype), embeds)
        return embeds

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                grid_thws: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, output_hidden_states: bool = False,
                targets: torch.Tensor | None = None, always_run_vision: bool = False) -> OvisOutput:
        """input_ids (B, L) with negative placeholders. `attention_mask` (B, L) marks padding (1 = real).

        Packed training passes B=1 with `cu_seqlens` (sequence offsets) and per-sample `position_ids`.
        `logits_to_keep` > 0 computes logits for the last that many positions only.
        `labels` gives the reference's mean next-token loss (labels shifted here). `targets` (already shifted,
        IGNORE_ID elsewhere) gives the *summed* cross entropy over supervised positions only, computing no
        other logits (training: the trainer normalises by the global number of supervised tokens), and the
        per-position log-probs of the targets (`token_logps`, for DPO/GRPO sequence and token scores).
        `always_run_vision` runs the visual tokenizer on a blank image when there are no pixels and adds 0 x
        its output, so every data-parallel rank runs the same collectives (FSDP) and every vision parameter
        gets a (zero) gradient (DDP).
        """
        # Under autocast only the decoder layers run in low precision: the visual tokenizer, the VET and the
        # logits stay float32 (with them in bfloat16 the tiny demo's P2 learned worse and ran slower; DEMO.md)
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        full_precision = torch.autocast(device.type, enabled=False)
        if inputs_embeds is None:
            with full_precision:
                inputs_embeds = self.merge_embeddings(input_ids, pixel_values, grid_thws)
                if always_run_vision and pixel_values is None:
                    inputs_embeds = inputs_embeds + 0.0 * self.blank_visual_embeddings().sum()
        b, n = inputs_embeds.shape[:2]
        ctx = AttnContext(cu_seqlens=cu_seqlens)
        if attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.bool()
            causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
            eye = torch.eye(n, dtype=torch.bool, device=valid.device)
            ctx.mask = ((causal & valid[:, None, :]) | eye)[:, None]  # padded rows attend to themselves only
            if position_ids is None:
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(n, device=inputs_embeds.device).expand(b, n)
        out = self.llm(inputs_embeds, position_ids, ctx, output_hidden_states=output_hidden_states)
        hidden, states = out if output_hidden_states else (out, None)
        if targets is not None:
            keep = targets != IGNORE_ID
            with full_precision:
                logits = self.llm.lm_head(hidden[keep]).float()
                token_loss = F.cross_entropy(logits, targets[keep], reduction="none")
            return OvisOutput(logits=None, loss=token_loss.sum(), hidden_states=states, token_logps=-token_loss)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        with full_precision:
            logits = self.llm.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return OvisOutput(logits=logits, loss=loss, hidden_states=states)

    def num_visual_atoms(self, grid_thws: torch.Tensor) -> int:
        vc = self.config.vit_config
        return num_visual_atoms(grid_thws, vc.hidden_stride, vc.temporal_patch_size)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy; labels are not shifted (position i predicts labels[i+1])."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_ID, reduction=reduction)
