"""ovis25: a fast, hackable PyTorch implementation of the Ovis2.5 multimodal LLM."""
from .config import OvisConfig, Qwen3Config, VisionConfig
from .model import Ovis

__all__ = ["Ovis", "OvisConfig", "Qwen3Config", "VisionConfig", "Processor"]
__version__ = "0.1.0"


def __getattr__(name):  # the processor is imported lazily so the model works without its extras
    if name == "Processor":
        from .processing.processor import Processor
        return Processor
    raise AttributeError(f"module 'ovis25' has no attribute {name!r}")
