"""Training: data in the official format, packing, the P1-P3 curriculum, DPO and GRPO."""
from .config import TrainConfig, load_recipe
from .trainer import train

__all__ = ["TrainConfig", "load_recipe", "train"]
