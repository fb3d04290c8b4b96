"""Images and videos named by URL in a request: `data:` base64, local files (only under --allow-local-dir)
and http(s) (only with --allow-remote-urls), each within the size, time and pixel limits.

Remote fetches connect only to public addresses: every connection, the first one and each redirect's,
checks the very address it connects to (so a DNS answer that changes between a check and the connect
cannot get around it); --allow-private-network lets chosen networks through. Proxies from the environment
are not used, since through a proxy the address connected to could not be checked.
"""
from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import socket
import ssl
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


# What clients send. Pillow opens more, among them formats that run external programs on the data (EPS
# runs Ghostscript) or that few people fuzz; untrusted bytes get only these decoders.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO (phone cameras)


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
    Image.init()  # registers all plugins, as Image.open does by itself only without `formats`
    try:
        with warnings.catch_warnings():  # our own pixel limit below is the one that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise APIError(400, f"{where}: image is too large: {e}", where, "image_too_large") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{where}: not a readable image ({len(data)} bytes; supported formats: "
                            f"{', '.join(IMAGE_FORMATS)})", where, "invalid_image") from e
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
        with _opener(settings).open(request, timeout=settings.fetch_timeout) as response:
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
    except urllib.error.URLError as e:
        if isinstance(e.reason, AddressNotAllowed):
            raise APIError(403, f"{where}: {e.reason}", where, "url_not_allowed") from e
        raise APIError(400, f"{where}: cannot fetch the URL: {e.reason}", where, "fetch_failed") from e
    except (http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise APIError(400, f"{where}: cannot fetch the URL: {reason}", where, "fetch_failed") from e
    return b"".join(chunks)


class AddressNotAllowed(OSError):
    """A remote URL, or one it redirects to, resolves to an address the server must not connect to."""


def address_allowed(address: str, settings: ServerSettings) -> bool:
    """Public unicast addresses, and those inside --allow-private-network; never loopback, private,
    link-local (cloud metadata at 169.254.169.254), shared, reserved or multicast ones by default."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip in network for network in settings.allow_private_networks):
        return True
    return ip.is_global and not ip.is_multicast


def _connect_checked(settings: ServerSettings, address: tuple[str, int], timeout: object = None,
                     source_address: tuple[str, int] | None = None) -> socket.socket:
    """socket.create_connection that refuses a host any of whose addresses is not allowed."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if not address_allowed(sockaddr[0], settings):
            raise AddressNotAllowed(f"the host {host!r} resolves to {sockaddr[0]}, a loopback, private, link-local "
                                    "or otherwise non-public address; this server does not fetch from such "
                                    "addresses (see --allow-private-network)")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, (int, float)):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"cannot resolve {host!r}")


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, settings: ServerSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect_checked, settings)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, settings: ServerSettings, **kwargs):
        super().__init__(*args, **kwargs)  # TLS is layered over the checked socket; SNI keeps the host name
        self._create_connection = functools.partial(_connect_checked, settings)


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, settings: ServerSettings):
        super().__init__()
        self.settings = settings

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_CheckedHTTPConnection, settings=self.settings), req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, settings: ServerSettings):
        super().__init__()
        self.settings = settings

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_CheckedHTTPSConnection, settings=self.settings), req,
                            context=ssl.create_default_context())


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirected to a {scheme}: URL; only http(s) is fetched")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(settings: ServerSettings) -> urllib.request.OpenerDirector:
    """http(s) only, every connection address-checked, at most 5 redirects, no proxies, no other schemes."""
    opener = urllib.request.OpenerDirector()
    for handler in (_CheckedHTTPHandler(settings), _CheckedHTTPSHandler(settings), _Redirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


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


# Demuxers for real video files. Left out on purpose: playlist and script formats (hls, concat, ...) that
# make FFmpeg open further files or URLs named inside the data.
VIDEO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpeg,mpegts,flv,ogg,gif,h264,hevc,m4v"


def _read_video(path: str | Path, where: str, num_frames: int) -> list[Image.Image]:
    try:
        import av
        try:  # identify the container with only the allowed demuxers before read_video decodes it
            with av.open(str(path), container_options={"format_whitelist": VIDEO_FORMATS,
                                                       "protocol_whitelist": "file"}):
                pass
        except (av.FFmpegError, OSError) as e:
            raise APIError(400, f"{where}: not a video in a supported container ({VIDEO_FORMATS})", where,
                           "invalid_video") from e
        return read_video(path, num_frames)
    except ImportError as e:
        raise APIError(400, f"{where}: this server cannot read videos: {e}", where, "video_unsupported") from e
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", where, "invalid_video") from e
