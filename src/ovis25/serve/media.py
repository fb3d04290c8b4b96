"""Images and videos named by URL in a request: `data:` base64, local files (only under --allow-local-dir)
and http(s) (only with --allow-remote-urls), each within the size, time and pixel limits."""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..processing.image import load_image
from ..processing.video import read_video
from .errors import APIError
from .settings import ServerSettings


def load_image_url(url: str, where: str, settings: ServerSettings) -> Image.Image:
    """A fully decoded image; `where` (e.g. "messages[0].content[1]") names the item in errors."""
    if _kind(url, where) == "local":
        data = _read_local(url, where, settings)
    else:
        data = _read_bytes(url, where, settings)
    return decode_image(data, where, settings.max_pixels)


def load_video_url(url: str, where: str, settings: ServerSettings, num_frames: int) -> list[Image.Image]:
    """Uniformly sampled frames of a video file."""
    if _kind(url, where) == "local":
        path = _local_path(url, where, settings)
        _check_size(path, where, settings)
        frames = _read_video(path, where, num_frames)
    else:
        data = _read_bytes(url, where, settings)
        with tempfile.NamedTemporaryFile(suffix=".video") as f:  # PyAV reads from a path
            f.write(data)
            f.flush()
            frames = _read_video(f.name, where, num_frames)
    width, height = frames[0].size
    if width * height > settings.max_pixels:
        raise APIError(400, f"{where}: video frames are {width}x{height} = {width * height} pixels, more than the "
                            f"server's --max-pixels={settings.max_pixels}", where, "image_too_large")
    return frames


def decode_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():  # our own pixel limit below is the one that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise APIError(400, f"{where}: image is too large: {e}", where, "image_too_large") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{where}: not a readable image ({len(data)} bytes)", where, "invalid_image") from e
    width, height = image.size
    if width * height > max_pixels:  # checked before decoding the pixels
        raise APIError(400, f"{where}: image is {width}x{height} = {width * height} pixels, more than the server's "
                            f"--max-pixels={max_pixels}", where, "image_too_large")
    try:
        return load_image(image, None, where)
    except ValueError as e:
        raise APIError(400, str(e), where, "invalid_image") from e


def _kind(url: str, where: str) -> str:
    if url.startswith("data:"):
        return "data"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return "remote"
    if scheme == "file" or not scheme or len(scheme) == 1:  # a plain path (one letter: a Windows drive)
        return "local"
    raise APIError(400, f"{where}: unsupported URL scheme {scheme!r} (use data:, http(s):, file: or a path)",
                   where, "invalid_url")


def _read_bytes(url: str, where: str, settings: ServerSettings) -> bytes:
    return _decode_data_url(url, where, settings) if url.startswith("data:") else _fetch(url, where, settings)


def _decode_data_url(url: str, where: str, settings: ServerSettings) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise APIError(400, f"{where}: malformed data URL (no ',' before the data)", where, "invalid_url")
    if not header.lower().endswith(";base64"):
        raise APIError(400, f"{where}: only base64 data URLs are supported (data:<mime>;base64,<data>)",
                       where, "invalid_url")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > settings.max_media_bytes:
        raise APIError(400, f"{where}: inline data is larger than the server's limit of "
                            f"{settings.max_media_bytes} bytes", where, "media_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: malformed base64 in the data URL: {e}", where, "invalid_base64") from e


def _fetch(url: str, where: str, settings: ServerSettings) -> bytes:
    if not settings.allow_remote_urls:
        raise APIError(403, f"{where}: remote URLs are disabled on this server (start it with --allow-remote-urls)",
                       where, "remote_urls_disabled")
    limit, deadline = settings.max_media_bytes, time.monotonic() + settings.fetch_timeout
    request = urllib.request.Request(url, headers={"User-Agent": "ovis25-server"})
    try:
        with urllib.request.urlopen(request, timeout=settings.fetch_timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise APIError(400, f"{where}: remote file is {declared} bytes, more than the server's limit of "
                                    f"{limit} bytes", where, "media_too_large")
            chunks, total = [], 0
            while chunk := response.read1(1 << 16):  # returns what has arrived, so the clock is checked
                total += len(chunk)
                if total > limit:
                    raise APIError(400, f"{where}: remote file is larger than the server's limit of {limit} bytes",
                                   where, "media_too_large")
                if time.monotonic() > deadline:
                    raise APIError(400, f"{where}: download took longer than {settings.fetch_timeout:g} s",
                                   where, "fetch_timeout")
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise APIError(400, f"{where}: fetching the URL failed with HTTP {e.code}", where, "fetch_failed") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"{where}: cannot fetch the URL: {reason}", where, "fetch_failed") from e
    return b"".join(chunks)


def _local_path(url: str, where: str, settings: ServerSettings) -> Path:
    """The real path of a file inside --allow-local-dir (symlinks resolved, so no way out of it)."""
    root = settings.allow_local_dir
    if root is None:
        raise APIError(403, f"{where}: local file paths are disabled on this server (start it with "
                            "--allow-local-dir DIR)", where, "local_files_disabled")
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"{where}: file URLs must not name a host", where, "invalid_url")
        path = Path(urllib.parse.unquote(parts.path))
    else:
        path = Path(url)
    real = (root / path).resolve()  # an absolute `path` replaces root
    if not real.is_relative_to(root):
        raise APIError(403, f"{where}: the path is outside the directory allowed by --allow-local-dir",
                       where, "path_not_allowed")
    if not real.is_file():
        raise APIError(400, f"{where}: no such file in the allowed directory", where, "file_not_found")
    return real


def _check_size(path: Path, where: str, settings: ServerSettings) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise APIError(400, f"{where}: cannot read the file: {e.strerror or e}", where, "file_not_found") from e
    if size > settings.max_media_bytes:
        raise APIError(400, f"{where}: file is larger than the server's limit of {settings.max_media_bytes} bytes",
                       where, "media_too_large")


def _read_local(url: str, where: str, settings: ServerSettings) -> bytes:
    path = _local_path(url, where, settings)
    _check_size(path, where, settings)
    try:
        return path.read_bytes()
    except OSError as e:
        raise APIError(400, f"{where}: cannot read the file: {e.strerror or e}", where, "file_not_found") from e


def _read_video(path: str | Path, where: str, num_frames: int) -> list[Image.Image]:
    try:
        return read_video(path, num_frames)
    except ImportError as e:
        raise APIError(400, f"{where}: this server cannot read videos: {e}", where, "video_unsupported") from e
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", where, "invalid_video") from e
