"""The OpenAI-compatible server, run for real on a loopback port and called with the official `openai`
client (and raw HTTP for malformed requests): parity with Chat.generate, streaming, thinking, n, stop,
limits and errors, concurrency, queue limits and client disconnects."""
import asyncio
import base64
import http.client
import http.server
import io
import json
import os
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pathlib import Path

import av
import openai
import pytest
import uvicorn
from PIL import Image

from conftest import FIXTURES, manifest, model_dir, reference, requires_fixtures
import ovis25
from ovis25.reasoning import strip_think_tags
from ovis25.serve import ServerSettings, create_app
from ovis25.serve.process import ServerProcess
from ovis25.serve.worker import EngineWorker, QueueFull

pytestmark = requires_fixtures

KEY = "test-key"
SMALL = {"min_pixels": 4096, "max_pixels": 25600}  # keeps every test fast
SMALL_KWARGS = {"mm_processor_kwargs": {"images_kwargs": SMALL}}


def image_file(i: int = 0):
    names = sorted(n for n in manifest()["images"] if n.startswith("rgb_"))
    return FIXTURES / manifest()["images"][names[i % len(names)]]["file"]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def image_message(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def as_chat_messages(text: str, image: Image.Image | None) -> list[dict]:
    """The same request in the Chat API's HF-message form."""
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


class Server:
    """A uvicorn server in a background thread on a free loopback port."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=0, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data)


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    Image.open(image_file(0)).save(root / "inside.png")
    Image.open(image_file(1)).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")  # a symlink must not lead out
    write_video(root / "clip.mp4")
    write_video(outside / "secret.ts", container="mpegts")
    (root / "playlist.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.5,\nfile://{outside}/secret.ts"
                                        "\n#EXT-X-ENDLIST\n")
    return root


def write_video(path, frames: int = 6, container: str | None = None) -> None:
    with av.open(str(path), "w", format=container) as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), (40 * i, 120, 200 - 30 * i)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def server(allowed_dir):
    chat = ovis25.Chat.from_pretrained(model_dir())
    settings = ServerSettings(model_name=model_dir().name, api_key=KEY, allow_local_dir=allowed_dir, max_batch=4,
                              max_queue=64, max_body_bytes=300_000, max_images=3, max_pixels=1_000_000,
                              max_tokens_limit=64, max_model_len=1024)
    s = Server(create_app(chat, settings))
    yield s
    s.close()


# ---- parity with Chat.generate -------------------------------------------------------------------------------

def test_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [model_dir().name]
    assert client.models.retrieve(model_dir().name).id == model_dir().name
    status, body = raw(server.port, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("think", [False, True])
def test_image_request_matches_chat_generate(server, think):
    """Greedy, image as a data URL: same text (and thinking, tags removed) as Chat.generate, streamed or not."""
    image = Image.open(image_file(0))
    url = data_url(image_file(0).read_bytes())
    budget = 3 if think else None  # the budget makes the tiny model close </think> and answer
    expected = reference().generate(as_chat_messages("What is in the picture?", image), enable_thinking=think,
                                    thinking_budget=budget, max_new_tokens=40, **SMALL)
    extra = {**SMALL_KWARGS, "chat_template_kwargs": {"enable_thinking": think}, "thinking_budget": budget}
    client = server.client()
    res = client.chat.completions.create(model=model_dir().name, messages=image_message("What is in the picture?", url),
                                         max_tokens=40, temperature=0, extra_body=extra)
    message = res.choices[0].message
    assert message.content == expected.text
    assert message.reasoning_content == (strip_think_tags(expected.thinking) or None)
    if think:
        assert message.reasoning_content and "</think>" not in message.reasoning_content
    assert res.choices[0].finish_reason == expected.finish_reason
    assert res.usage.prompt_tokens == expected.usage["prompt_tokens"]
    assert res.usage.completion_tokens == len(expected.token_ids)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens

    content, reasoning, finish = [], [], None
    for chunk in client.chat.completions.create(model=model_dir().name, messages=image_message(
            "What is in the picture?", url), max_tokens=40, temperature=0, stream=True, extra_body=extra):
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(content) == expected.text
    assert "".join(reasoning) == (strip_think_tags(expected.thinking) if think else "")
    assert finish == expected.finish_reason


def test_thinking_budget_caps_thinking(server):
    """thinking_budget=1: one free thinking token, then the forced early-stop text closes the thinking."""
    messages = [{"role": "user", "content": "Think hard."}]
    extra = {"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": 1}
    res = server.client().chat.completions.create(model=model_dir().name, messages=messages, max_tokens=64,
                                                  temperature=0, extra_body=extra)
    expected = reference().generate(messages, enable_thinking=True, thinking_budget=1, max_new_tokens=64)
    early_stop = reference().processor.tokenizer.encode(ovis25.generation.EARLY_STOP_TEXT)
    assert expected.token_ids[1:1 + len(early_stop)] == early_stop
    # 1 free token + the early-stop ids up to </think> (the "\n\n" after it belongs to the answer)
    assert res.usage.completion_tokens_details.reasoning_tokens == expected.usage["thinking_tokens"] == len(early_stop)
    assert res.choices[0].message.reasoning_content == strip_think_tags(expected.thinking)
    assert res.choices[0].message.reasoning_content.endswith("based on the thinking directly now.")
    assert res.choices[0].message.content == expected.text


def test_default_pixel_budget_matches_chat_defaults(server):
    image = Image.open(image_file(1))
    expected = reference().generate(as_chat_messages("Describe.", image), max_new_tokens=8)
    res = server.client().chat.completions.create(
        model=model_dir().name, messages=image_message("Describe.", data_url(png_bytes(image))), max_tokens=8,
        temperature=0)
    assert res.choices[0].message.content == expected.text
    assert res.usage.prompt_tokens == expected.usage["prompt_tokens"]


def test_n_choices_stop_and_seed(server):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about stripes."}]
    expected = reference().generate(messages, max_new_tokens=24)
    res = client.chat.completions.create(model=model_dir().name, messages=messages, max_tokens=24, temperature=0, n=2)
    assert [c.index for c in res.choices] == [0, 1]
    assert [c.message.content for c in res.choices] == [expected.text] * 2
    assert res.usage.completion_tokens == 2 * len(expected.token_ids)

    words = expected.text.split()
    stop = words[len(words) // 2]
    cut = reference().generate(messages, max_new_tokens=24, stop=[stop])
    res = client.chat.completions.create(model=model_dir().name, messages=messages, max_tokens=24, temperature=0,
                                         stop=[stop, "never-there"])
    assert res.choices[0].message.content == cut.text and stop not in cut.text
    assert res.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(model=model_dir().name, messages=messages, max_tokens=12, n=2,
                                              temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20})
               for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]


def test_local_files_and_video(server, allowed_dir):
    client = server.client()
    expected = reference().generate(as_chat_messages("Look.", Image.open(allowed_dir / "inside.png")),
                                    max_new_tokens=8, **SMALL)
    for url in (f"file://{allowed_dir / 'inside.png'}", str(allowed_dir / "inside.png"), "inside.png"):
        res = client.chat.completions.create(model=model_dir().name, messages=image_message("Look.", url),
                                             max_tokens=8, temperature=0, extra_body=SMALL_KWARGS)
        assert res.choices[0].message.content == expected.text

    frames = ovis25.processing.read_video(allowed_dir / "clip.mp4", 8)
    expected = reference().generate([{"role": "user", "content": [{"type": "video", "video": frames},
                                                                  {"type": "text", "text": "What moves?"}]}],
                                    max_new_tokens=8, **SMALL)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                             {"type": "text", "text": "What moves?"}]}]
    res = client.chat.completions.create(model=model_dir().name, messages=messages, max_tokens=8, temperature=0,
                                         extra_body=SMALL_KWARGS)
    assert res.choices[0].message.content == expected.text


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves FILES; /slow.png dribbles its bytes out slower than the server's fetch timeout allows;
    /redirect?URL answers 302 to URL."""

    FILES: dict[str, bytes] = {}

    def do_GET(self):
        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.partition("?")[2])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.FILES.get(self.path.lstrip("/").removeprefix("slow-"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.path.startswith("/slow-"):
            for i in range(0, len(data), 64):
                self.wfile.write(data[i:i + 64])
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


def file_server(host: str) -> http.server.ThreadingHTTPServer:
    files = http.server.ThreadingHTTPServer((host, 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    return files


def test_remote_urls():
    """--allow-remote-urls: http(s) images are fetched within the size and time limits, from public addresses
    only unless --allow-private-network lets a network through, and redirects are held to the same rule.
    The "internal" file server on 127.0.0.2 stands for a private service the server must not reach."""
    small = image_file(0).read_bytes()
    _Files.FILES = {"img.png": small, "big.png": png_bytes(Image.effect_noise((200, 200), 50).convert("RGB"))}
    assert len(_Files.FILES["big.png"]) > 20_000 > len(small)
    files, internal = file_server("127.0.0.1"), file_server("127.0.0.2")
    base = f"http://127.0.0.1:{files.server_address[1]}"
    inside = f"127.0.0.2:{internal.server_address[1]}/img.png"
    chat = ovis25.Chat.from_pretrained(model_dir())
    settings = ServerSettings(model_name="remote", allow_remote_urls=True, max_media_bytes=20_000, fetch_timeout=1.0,
                              allow_private_networks=("127.0.0.1/32",))
    server = Server(create_app(chat, settings))
    default = Server(create_app(chat, ServerSettings(model_name="remote", allow_remote_urls=True)))
    try:
        client = server.client()
        expected = reference().generate(as_chat_messages("Look.", Image.open(image_file(0))), max_new_tokens=6,
                                        **SMALL)
        for url in (f"{base}/img.png", f"{base}/redirect?{base}/img.png"):
            res = client.chat.completions.create(model="remote", messages=image_message("Look.", url),
                                                 max_tokens=6, temperature=0, extra_body=SMALL_KWARGS)
            assert res.choices[0].message.content == expected.text
        refused = [
            (server, "big.png", 400, "media_too_large"), (server, "slow-img.png", 400, "fetch_timeout"),
            (server, "missing.png", 400, "fetch_failed"),
            # redirects out of the allowed network: loopback, IPv4-mapped IPv6, cloud metadata (link-local)
            (server, f"redirect?http://{inside}", 403, "url_not_allowed"),
            (server, f"redirect?http://[::ffff:{inside.replace(':', ']:', 1)}", 403, "url_not_allowed"),
            (server, "redirect?http://169.254.169.254/latest/meta-data/", 403, "url_not_allowed"),
            # other schemes and endless redirects are not followed
            (server, "redirect?file:///etc/hostname", 400, "fetch_failed"),
            (server, f"redirect?{base}/redirect?{base}/redirect?{base}/redirect?{base}/redirect?{base}/redirect?"
                     f"{base}/img.png", 400, "fetch_failed"),
            (default, "img.png", 403, "url_not_allowed"),  # the default: no private address at all
        ]
        for target, path, status, code in refused:
            body = json.dumps({"messages": image_message("Look.", f"{base}/{path}"), "max_tokens": 2}).encode()
            got, reply = raw(target.port, "POST", "/v1/chat/completions", body)
            assert (got, reply["error"]["code"]) == (status, code), (path, reply)
        assert "127.0.0.2" in raw(server.port, "POST", "/v1/chat/completions", json.dumps(
            {"messages": image_message("Look.", f"http://{inside}"), "max_tokens": 2}).encode())[1]["error"]["message"]
    finally:
        server.close()
        default.close()
        files.shutdown()
        internal.shutdown()


def test_address_policy():
    from ovis25.serve.media import address_allowed
    default = ServerSettings(model_name="m")
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "::1", "fe80::1%eth0", "fc00::1", "::ffff:10.0.0.1", "::"):
        assert not address_allowed(address, default), address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert address_allowed(address, default), address
    opened = ServerSettings(model_name="m", allow_private_networks=("10.0.0.0/8", "::1"))
    assert address_allowed("10.9.9.9", opened) and address_allowed("::1", opened)
    assert not address_allowed("127.0.0.1", opened)
    with pytest.raises(ValueError, match="allow_private_networks"):
        ServerSettings(model_name="m", allow_private_networks=("not-a-network",))


# ---- bad requests ------------------------------------------------------------------------------------------------

def chat_body(**changes) -> dict:
    body = {"model": model_dir().name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    return {**body, **changes}


def with_image(url: str) -> dict:
    return chat_body(messages=image_message("hi", url))


def with_video(url: str) -> dict:
    return chat_body(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}])


BAD_REQUESTS = {
    "malformed base64": (lambda d: with_image("data:image/png;base64,@@not*base64@@"), 400, "invalid_base64"),
    "non-image bytes": (lambda d: with_image(data_url(b"this is plain text, not a picture")), 400, "invalid_image"),
    "a video that is not one": (lambda d: chat_body(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(b"garbage" * 100, "video/mp4")}}]}]), 400,
        "invalid_video"),
    # FFmpeg scripts that make it open other files are not demuxed: an uploaded concat script naming a
    # video relative to the temp dir it is written to, a playlist in the allowed dir naming one outside it
    "a concat script as a video": (lambda d: with_video(data_url(
        f"ffconcat version 1.0\nfile {os.path.relpath(d / 'clip.mp4', tempfile.gettempdir())}\n".encode(),
        "video/mp4")), 400, "invalid_video"),
    "an HLS playlist leading out": (lambda d: with_video("playlist.m3u8"), 400, "invalid_video"),
    # Pillow would hand EPS to Ghostscript; only common raster formats are decoded
    "an EPS image": (lambda d: with_image(data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")),
                     400, "invalid_image"),
    "too many pixels": (lambda d: with_image(data_url(png_bytes(Image.new("RGB", (1200, 1000))))), 400,
                        "image_too_large"),
    "pixel budget over the limit": (lambda d: chat_body(
        mm_processor_kwargs={"images_kwargs": {"max_pixels": 2_000_000}}), 400, "pixel_budget_too_large"),
    "too many images": (lambda d: chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image_file(0).read_bytes())}}] * 4}]), 400,
        "too_many_images"),
    "max_tokens over the limit": (lambda d: chat_body(max_tokens=65), 400, "max_tokens_too_large"),
    "thinking_budget over the limit": (lambda d: chat_body(thinking_budget=10**6), 400, "max_tokens_too_large"),
    "unknown model": (lambda d: chat_body(model="gpt-4o"), 404, "model_not_found"),
    "no messages": (lambda d: chat_body(messages=[]), 400, "invalid_messages"),
    "bad role": (lambda d: chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_role"),
    "negative temperature": (lambda d: chat_body(temperature=-1), 400, "invalid_value"),
    "bad stop": (lambda d: chat_body(stop=[""]), 400, "invalid_value"),
    "bad thinking flag": (lambda d: chat_body(chat_template_kwargs={"enable_thinking": "yes"}), 400,
                          "invalid_type"),
    "unsupported logprobs": (lambda d: chat_body(logprobs=True), 400, "unsupported"),
    "path outside the allowed dir": (lambda d: with_image("/etc/hostname"), 403, "path_not_allowed"),
    "path traversal": (lambda d: with_image("../" * 8 + "etc/hostname"), 403, "path_not_allowed"),
    "symlink out of the allowed dir": (lambda d: with_image(f"file://{d / 'link.png'}"), 403, "path_not_allowed"),
    "missing local file": (lambda d: with_image("nope.png"), 400, "file_not_found"),
    "remote URL without --allow-remote-urls": (lambda d: with_image("http://127.0.0.1:9/x.png"), 403,
                                               "remote_urls_disabled"),
    "unsupported scheme": (lambda d: with_image("ftp://example.com/x.png"), 400, "invalid_url"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request(server, allowed_dir, name):
    build, status, code = BAD_REQUESTS[name]
    got, body = raw(server.port, "POST", "/v1/chat/completions", json.dumps(build(allowed_dir)).encode(),
                    {"Authorization": f"Bearer {KEY}"})
    assert (got, body["error"]["code"]) == (status, code), body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def test_malformed_http(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = raw(server.port, "POST", "/v1/chat/completions", b"{not json", auth)
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = raw(server.port, "POST", "/v1/chat/completions", b"[1, 2]", auth)
    assert status == 400
    for bad in (b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # nested deeper than json can parse
                b'{"max_tokens": ' + b"9" * 5000 + b"}"):  # an integer longer than Python converts
        status, body = raw(server.port, "POST", "/v1/chat/completions", bad, auth)
        assert (status, body["error"]["code"]) == (400, "invalid_json"), body
    status, body = raw(server.port, "POST", "/v1/chat/completions", b" " * 400_000, auth)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert "--max-body-bytes" in body["error"]["message"]
    status, body = raw(server.port, "GET", "/v1/nowhere", headers=auth)
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_api_key_is_enforced(server):
    body = json.dumps(chat_body()).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path, data in (("POST", "/v1/chat/completions", body), ("GET", "/v1/models", None)):
            status, reply = raw(server.port, method, path, data, headers)
            assert status == 401 and reply["error"]["type"] == "authentication_error", (headers, path)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="base64"):
        server.client().chat.completions.create(model=model_dir().name, messages=image_message(
            "hi", "data:image/png;base64,!!!"), max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert raw(server.port, "GET", "/health")[0] == 200  # no key needed
    for path in ("/docs", "/openapi.json", "/redoc"):  # no API description served, with or without a key
        assert raw(server.port, "GET", path, headers={"Authorization": f"Bearer {KEY}"})[0] == 404


# ---- concurrency ------------------------------------------------------------------------------------------------

def test_concurrent_requests_equal_one_by_one(server):
    """32 greedy requests (images and text, different lengths) from 8 threads, batched by the server:
    each answer equals the one computed alone."""
    variants = []
    for i in range(4):
        image = Image.open(image_file(i)) if i % 2 == 0 else None
        text = f"Question {i}: what do you see?"
        expected = reference().generate(as_chat_messages(text, image), max_new_tokens=6 + 3 * i, **SMALL).text
        messages = image_message(text, data_url(png_bytes(image))) if image else as_chat_messages(text, None)
        variants.append((messages, 6 + 3 * i, expected))
    client = server.client(timeout=120)

    def ask(k: int) -> bool:
        messages, max_tokens, expected = variants[k % len(variants)]
        res = client.chat.completions.create(model=model_dir().name, messages=messages, max_tokens=max_tokens,
                                             temperature=0, extra_body=SMALL_KWARGS)
        return res.choices[0].message.content == expected

    rss = []
    for _ in range(2):  # memory is bounded: a second round of 32 requests does not grow the process
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(ask, range(32)))
        rss.append(current_rss_mb())
    assert rss[1] - rss[0] < 40, f"RSS grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB across identical rounds"
    status, body = raw(server.port, "GET", "/health")
    assert status == 200 and body["requests"] == 0


def current_rss_mb() -> float:
    """Resident memory of this process (the server runs in a thread of it), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system")


LONG = {"messages": [{"role": "user", "content": "Count forever."}], "extra_body": {"ignore_eos": True}}
LONG_SERVER = ("--max-tokens-limit", "100000", "--max-model-len", "100100", "--log-level", "warning")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the tiny model is faster on one thread on a busy machine


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port`, from /proc/net/tcp (hex, little-endian)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_cli_server_queue_limit_and_disconnect():
    """`ovis25 serve` with one slot and no queue: it listens on loopback only by default; a second request
    gets 429 at once; closing a stream aborts its generation and frees the slot (an aborted request must go
    within seconds, not run 100000 tokens)."""
    with ServerProcess(model_dir(), "--max-batch", "1", "--max-queue", "0", *LONG_SERVER, env=ONE_THREAD) as proc:
        assert listening_addresses(proc.port) == {"127.0.0.1"}  # no --host given
        client = openai.OpenAI(base_url=proc.base_url, api_key="unused", max_retries=0)
        long = client.chat.completions.create(model=model_dir().name, max_tokens=100000, stream=True,
                                              temperature=0, **LONG)
        next(iter(long))  # generation is running
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=model_dir().name, messages=LONG["messages"], max_tokens=2)
        assert err.value.body["code"] == "queue_full"
        long.close()  # the client goes away mid-stream
        proc.wait_idle(10)

        # The same for a non-streaming request whose client hangs up while it is being generated.
        body = json.dumps({"messages": LONG["messages"], "max_tokens": 100000, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", proc.port)) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 10
            while not proc.health()["requests"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        proc.wait_idle(10)
        res = client.chat.completions.create(model=model_dir().name, messages=LONG["messages"], max_tokens=2)
        assert res.choices[0].finish_reason in ("stop", "length")


def test_request_timeout():
    """--request-timeout: a request still generating when it runs out is aborted in the engine (the server
    holds nothing afterwards) and answered 504 request_timeout; streamed, with an error event."""
    settings = ServerSettings(model_name="m", max_tokens_limit=100000, max_model_len=100100, request_timeout=1.0)
    server = Server(create_app(ovis25.Chat.from_pretrained(model_dir()), settings))
    try:
        client = server.client()
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="m", max_tokens=100000, **LONG)
        assert err.value.status_code == 504 and err.value.body["code"] == "request_timeout"
        assert "--request-timeout=1 s" in err.value.body["message"]
        assert 1.0 <= time.monotonic() - t0 < 5
        wait_idle(server.port)
        chunks = 0
        with pytest.raises(openai.APIError) as err:
            for _ in client.chat.completions.create(model="m", max_tokens=100000, stream=True, **LONG):
                chunks += 1
        assert chunks > 1 and err.value.body["code"] == "request_timeout"
        wait_idle(server.port)
        res = client.chat.completions.create(model="m", messages=LONG["messages"], max_tokens=3)
        assert res.choices[0].finish_reason in ("stop", "length")
    finally:
        server.close()


def test_graceful_shutdown_finishes_in_flight_requests():
    """SIGTERM to `ovis25 serve` mid-stream: the server stops accepting connections, the stream in flight
    completes in full, a request that cannot finish within --drain-timeout gets a 503 error event, and the
    process exits with status 0."""
    with ServerProcess(model_dir(), "--drain-timeout", "6", *LONG_SERVER, env=ONE_THREAD) as proc:
        client = openai.OpenAI(base_url=proc.base_url, api_key="unused", max_retries=0, timeout=60)
        short = client.chat.completions.create(model=model_dir().name, max_tokens=100, stream=True,
                                               stream_options={"include_usage": True}, temperature=0, **LONG)
        endless = client.chat.completions.create(model=model_dir().name, max_tokens=100000, stream=True,
                                                 temperature=0, **LONG)
        short_chunks, endless_chunks = iter(short), iter(endless)
        next(short_chunks), next(endless_chunks)
        assert proc.health()["requests"] == 2  # both are being generated
        proc.proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()

        def read_endless() -> dict:
            with pytest.raises(openai.APIError) as err:
                for _ in endless_chunks:
                    pass
            return err.value.body

        with ThreadPoolExecutor(1) as pool:
            endless_error = pool.submit(read_endless)
            deadline = time.monotonic() + 3
            while True:  # new connections are refused while the requests drain
                try:
                    socket.create_connection(("127.0.0.1", proc.port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            rest = list(short_chunks)  # complete: had the drain run out first, this would be a 503 error event
            assert endless_error.result(timeout=30)["code"] == "server_shutting_down"
        finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"] and rest[-1].usage.completion_tokens == 100
        assert proc.proc.wait(30) == 0, proc.log_tail()
        assert time.monotonic() - sent_at < 6 + 5 + 5  # drain, uvicorn's margin, slack


def wait_idle(port: int) -> None:
    """Until the server holds no request (an aborted one must go within seconds, not run 100000 tokens)."""
    deadline = time.monotonic() + 10
    while raw(port, "GET", "/health")[1]["requests"]:
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.05)


def test_worker_survives_a_failing_engine():
    """An exception inside the engine fails the requests in flight with an error event; the worker lives on."""

    class BrokenEngine:
        def __init__(self):
            self.live = []

        def add_request(self, input_ids, pixel_values, grid_thws, config, request_id):
            if config == "bad":
                raise ValueError("bad prompt")
            self.live.append(request_id)

        def has_unfinished(self):
            return bool(self.live)

        def step(self):
            raise RuntimeError("out of memory")

        def abort(self, request_id):
            self.live.remove(request_id)

    worker = EngineWorker(BrokenEngine(), capacity=2)
    worker.start()
    try:
        events = []
        with pytest.raises(QueueFull):
            worker.submit([("a", {"input_ids": [1]}, None)] * 3, events.append)
        worker.submit([("a", {"input_ids": [1]}, None), ("b", {"input_ids": [1]}, "bad")], events.append)
        deadline = time.monotonic() + 5
        while len(events) < 2 or worker.held:
            assert time.monotonic() < deadline, events
            time.sleep(0.01)
        assert sorted(message for _, message in events) == ["bad prompt",
                                                            "generation failed: RuntimeError: out of memory"]
    finally:
        worker.stop()


def test_waiter_deadline_ends_in_a_timeout_event():
    """A request that gets no engine event before its deadline must get the timeout event from the very
    wait that ran out (it once came back as a quiet (None, None), which the stream took for an event)."""
    from ovis25.serve.app import _Waiter

    async def scenario():
        waiter = _Waiter(0.05)
        quiet = await waiter.next(poll=0.01)  # a poll shorter than the time left: nothing happened yet
        kind, error = await waiter.next()  # waits out the deadline itself
        return quiet, kind, error

    quiet, kind, error = asyncio.run(scenario())
    assert quiet == (None, None)
    assert kind == "timeout" and error.status == 504 and "--request-timeout=0.05 s" in str(error.body())
