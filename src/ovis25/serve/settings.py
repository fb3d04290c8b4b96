"""Server limits and options, validated once at start-up."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the id clients must use in "model" (the checkpoint directory name by default)
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"
    allow_local_dir: Path | None = None  # local image/video paths are allowed only inside this directory
    allow_remote_urls: bool = False  # fetch http(s) image/video URLs
    # Remote fetches (and their redirects) may only connect to public addresses; these networks are let
    # through as well (e.g. ("127.0.0.1/32",) for a local file server). CIDR strings, parsed at start-up.
    allow_private_networks: tuple[str | Network, ...] = ()
    max_batch: int = 4  # requests decoded together (KV-cache slots)
    max_queue: int = 32  # requests that may wait for a slot; beyond that -> 429
    max_body_bytes: int = 32 * 2**20  # request body size
    max_images: int = 8  # images and videos per request
    max_pixels: int = 4096 * 4096  # width * height of one input image or frame, and of a requested pixel budget
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for (also the default)
    max_model_len: int = 8192  # prompt + generated tokens per request (KV-cache length)
    max_media_bytes: int = 64 * 2**20  # one fetched or read image/video file
    fetch_timeout: float = 10.0  # seconds for a whole remote download
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None: no limit -> 504
    drain_timeout: float = 30.0  # on SIGTERM/SIGINT, seconds in-flight requests get to finish -> then 503

    def __post_init__(self) -> None:
        if not self.model_name or not isinstance(self.model_name, str):
            raise ValueError("model_name must be a non-empty string")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable authentication)")
        for name in ("max_batch", "max_body_bytes", "max_images", "max_pixels", "max_tokens_limit", "max_model_len",
                     "max_media_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        for name in ("fetch_timeout", "request_timeout", "drain_timeout"):
            value = getattr(self, name)
            if value is None and name == "request_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        networks = self.allow_private_networks
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False)
                             for n in ([networks] if isinstance(networks, str) else networks))
        except (TypeError, ValueError) as e:
            raise ValueError(f"allow_private_networks: {e}") from None
        object.__setattr__(self, "allow_private_networks", networks)
        if self.allow_local_dir is not None:
            root = Path(self.allow_local_dir).expanduser().resolve()  # symlinks resolved once, here
            if not root.is_dir():
                raise ValueError(f"allow_local_dir {str(self.allow_local_dir)!r} is not a directory")
            object.__setattr__(self, "allow_local_dir", root)

    @property
    def capacity(self) -> int:
        """Requests (counting each of n choices) the server holds at once: running plus waiting."""
        return self.max_batch + self.max_queue
