"""ovis25: a fast, hackable PyTorch implementation of the Ovis2.5 multimodal LLM."""
from .config import OvisConfig, Qwen3Config, VisionConfig
from .model import Ovis

__all__ = ["Ovis", "OvisConfig", "Qwen3Config", "VisionConfig", "Processor", "build_from_parts", "Chat",
           "GenerationResult"]
__version__ = "0.1.0"


def __getattr__(name):  # the processor is imported lazily so the model works without its extras
    if name == "Processor":
        from .processing.processor import Processor
        return Processor
    if name == "build_from_parts":
        from .build import build_from_parts
        return build_from_parts
    if name == "Chat":
        from .chat import Chat
        return Chat
    if name == "GenerationResult":
        from .generation import GenerationResult
        return GenerationResult
    raise AttributeError(f"module 'ovis25' has no attribute {name!r}")
