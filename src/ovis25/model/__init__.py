from .llm import KVCache, Qwen3ForCausalLM
from .ovis import Ovis, OvisOutput
from .vision import SiglipNaViT, VisualTokenizer

__all__ = ["Ovis", "OvisOutput", "KVCache", "Qwen3ForCausalLM", "SiglipNaViT", "VisualTokenizer"]
