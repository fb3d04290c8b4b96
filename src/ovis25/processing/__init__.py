"""Processing side of Ovis2.5: pixels, tokenizer, prompts."""
from .chat import (
    IGNORE_ID,
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    VIDEO_END_ID,
    VIDEO_START_ID,
    VIDEO_TOKEN_ID,
    VISUAL_ATOM_ID,
    format_conversation,
    render_chat_template,
    tokenize_with_placeholders,
)
from .image import PixelBudgets, load_image, media_kind, preprocess_image, smart_resize, to_rgb
from .processor import Processor
from .tokenizer import Tokenizer
from .video import preprocess_video, read_video

__all__ = [
    "IGNORE_ID", "IMAGE_END_ID", "IMAGE_START_ID", "IMAGE_TOKEN_ID", "VIDEO_END_ID", "VIDEO_START_ID",
    "VIDEO_TOKEN_ID", "VISUAL_ATOM_ID", "PixelBudgets", "Processor", "Tokenizer", "format_conversation",
    "load_image", "media_kind", "preprocess_image", "preprocess_video", "read_video", "render_chat_template",
    "smart_resize", "to_rgb", "tokenize_with_placeholders",
]
