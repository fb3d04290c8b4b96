"""OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn).

    from ovis25 import Chat
    from ovis25.serve import ServerSettings, create_app, serve
    serve(Chat.from_pretrained(path), ServerSettings(model_name="Ovis2.5-2B"), port=8000)
"""
from .app import create_app, serve
from .errors import APIError
from .settings import ServerSettings

__all__ = ["APIError", "ServerSettings", "create_app", "serve"]
