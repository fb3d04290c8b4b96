"""The synthetic world: seeded images with verifiable Q/A in the official Ovis dataset format, a BPE
trained on its text and a fresh tiny checkpoint to train on it (see `make demo`).

    manifest = build_world("world", seed=0, sizes="tiny")         # or: python -m ovis25.synth world
    write_model_dir("ckpt/init", "world/tokenizer")                # tiny_config sized for the tokenizer
"""
from .build import PRESETS, build_world
from .model import init_weights, tiny_config, write_model_dir
from .tokenizer import train_tokenizer, world_corpus
from .world import TASKS, Sample, thinking

__all__ = ["PRESETS", "TASKS", "Sample", "build_world", "init_weights", "thinking", "tiny_config",
           "train_tokenizer", "world_corpus", "write_model_dir"]
