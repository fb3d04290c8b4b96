"""A fresh tiny Ovis checkpoint for the synthetic world: config preset, weight init, checkpoint dir."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config import OvisConfig, Qwen3Config, VisionConfig
from ..model import Ovis
from ..processing import Processor
from ..processing.tokenizer import Tokenizer
from .tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN


def tiny_config(vocab_size: int) -> OvisConfig:
    """~2.5M parameters: a 4 x 128 ViT (64 px = 4x4 learned positions, full attention everywhere), a
    256-entry visual vocabulary and a 4 x 128 Qwen3 (4 heads / 2 kv, head_dim 32) with tied embeddings;
    the vocabulary is rounded up to a multiple of 64."""
    vit = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       image_size=64, patch_size=16, hidden_stride=2, fullatt_block_indexes=None)
    llm = Qwen3Config(vocab_size=-(-vocab_size // 64) * 64, hidden_size=128, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    return OvisConfig(vit, llm, visual_vocab_size=256)


def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """N(0, std) for every matrix (linears, convs, embeddings), zeros for biases, ones for norm weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed (and drawn) once
            if p.ndim > 1:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def write_model_dir(out_dir: str | Path, tokenizer_dir: str | Path, config: OvisConfig | None = None,
                    seed: int = 0, std: float = 0.02) -> Path:
    """A loadable checkpoint with freshly initialised weights: config.json, model.safetensors,
    generation_config.json, the tokenizer files, preprocessor_config.json and chat_template.json.
    `config` defaults to `tiny_config` sized for the tokenizer; eos/bos ids are set from the tokenizer."""
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    config = config or tiny_config(len(tokenizer))
    if config.llm_config.vocab_size < len(tokenizer):
        raise ValueError(f"config vocab_size {config.llm_config.vocab_size} < tokenizer size {len(tokenizer)}")
    eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    config.llm_config.bos_token_id, config.llm_config.eos_token_id = pad, eos  # as Qwen3
    model = Ovis.from_config(config)
    init_weights(model, std, seed)
    vit = config.vit_config
    processor = Processor(
        tokenizer, patch_size=vit.patch_size, hidden_stride=vit.hidden_stride,
        temporal_patch_size=vit.temporal_patch_size, chat_template=CHAT_TEMPLATE,
        preprocessor_config={"do_resize": True, "image_processor_type": "SiglipImageProcessor",
                             "size": {"height": vit.image_size, "width": vit.image_size}},
    )
    generation_config = {"bos_token_id": pad, "eos_token_id": [eos, pad], "pad_token_id": pad, "do_sample": False,
                         "multimodal_max_length": 2048}
    model.save_pretrained(out_dir, processor=processor, generation_config=generation_config)
    return Path(out_dir)
