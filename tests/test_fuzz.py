"""Hostile input, property-based (hypothesis): image bytes, message structures and generation parameters.

Properties: at the Python level (Processor, Chat) every input either works or raises a ValueError; at the
HTTP level every request is answered 200 or with an OpenAI-shaped 4xx, never a 5xx, a hang (each request
has a 60 s socket timeout) or a dead server, and the server answers /health and a normal request correctly
afterwards. Example counts are kept small for the suite; OVIS25_FUZZ_SCALE=N runs N times as many (the
figures in RELIABILITY.md come from such a run).
"""
import base64
import http.client
import io
import json
import os
import re
import struct
import time
import zlib
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import model_dir, reference, requires_fixtures
from test_server import SMALL, SMALL_KWARGS, Server, as_chat_messages, image_message, png_bytes
import ovis25
from ovis25.generation import GenerationResult
from ovis25.serve import ServerSettings, create_app

pytestmark = requires_fixtures

SCALE = int(os.environ.get("OVIS25_FUZZ_SCALE", "1"))
# examples run by kind and answers by kind, and the slowest Chat call: printed at the end of the module
# (pytest -s), the figures of RELIABILITY.md
CASES: dict[str, int] = {}
SLOWEST = [(0.0, "", "")]


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if CASES:
        print("\nfuzz examples run: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))
        print("slowest Chat call: %.2f s %s %s" % SLOWEST[0])


# ---- image bytes ---------------------------------------------------------------------------------------------

# modes and the formats that can store them
SAVE_FORMATS = {"RGB": ["PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF"], "RGBA": ["PNG", "WEBP", "TIFF"],
                "L": ["PNG", "JPEG", "BMP", "TIFF"], "LA": ["PNG"], "P": ["PNG", "GIF", "BMP"],
                "1": ["PNG", "BMP", "TIFF"], "I;16": ["PNG", "TIFF"], "I": ["PNG", "TIFF"], "F": ["TIFF"],
                "CMYK": ["JPEG", "TIFF"]}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"II*\x00", b"MM\x00*", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x00\x00\x01\x00", b"8BPS", b"P6\n"]


def noise(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-2**31, 2**31, (height, width), dtype=np.int32))
    if mode == "F":  # includes values no 8-bit conversion can represent
        values = rng.choice(np.array([0, 1, -1e30, 1e30, np.nan, np.inf, 0.5], dtype=np.float32), (height, width))
        return Image.fromarray(values)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_declaring(width: int, height: int, bit_depth: int = 8, color_type: int = 2, data: bytes = b"") -> bytes:
    """A PNG whose header claims any size (0, or billions of pixels) over little or no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid small JPEG with its frame header (SOF0) rewritten to another size."""
    data = bytearray(encode(noise("RGB", 16, 16, 0), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def zlib_bomb(side: int) -> bytes:
    """A grey PNG of side x side pixels that compresses to almost nothing."""
    return encode(Image.new("L", (side, side)), "PNG")


@st.composite
def encoded_images(draw) -> bytes:
    mode = draw(st.sampled_from(sorted(SAVE_FORMATS)))
    fmt = draw(st.sampled_from(SAVE_FORMATS[mode]))
    image = noise(mode, draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(0, 2**16)))
    kwargs = {}
    if fmt == "JPEG" and draw(st.booleans()):  # EXIF orientation, including values outside 1-8
        kwargs["exif"] = orientation(draw(st.integers(0, 65535)))
    if fmt == "GIF" and draw(st.booleans()):  # animated
        frames = [noise("P", *image.size, seed) for seed in range(draw(st.integers(1, 4)))]
        kwargs.update(save_all=True, append_images=frames, duration=draw(st.integers(0, 500)))
    return encode(image, fmt, **kwargs)


@st.composite
def mutated_images(draw) -> bytes:
    """A valid encoding with bytes flipped, cut out, inserted, or the file truncated."""
    data = bytearray(draw(encoded_images()))
    for op, position, chunk in draw(st.lists(st.tuples(st.sampled_from("fdit"), st.integers(0, 2**20),
                                                       st.binary(min_size=1, max_size=16)), min_size=1, max_size=6)):
        i = position % max(len(data), 1)
        if op == "f":
            data[i:i + len(chunk)] = chunk
        elif op == "d":
            del data[i:i + len(chunk)]
        elif op == "i":
            data[i:i] = chunk
        else:
            del data[i:]
    return bytes(data)


sizes = st.one_of(st.sampled_from([0, 1, 65535, 65536, 2**31 - 1]), st.integers(0, 2**31 - 1))
image_bytes = st.one_of(
    encoded_images(),
    mutated_images(),
    st.builds(png_declaring, sizes, sizes, st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([0, 2, 3, 4, 6]),
              st.binary(max_size=64)),
    st.builds(jpeg_declaring, st.integers(0, 65535), st.integers(0, 65535)),
    st.binary(max_size=2048),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC), st.binary(max_size=512)),
)

ANY = ...  # either outcome is right
# The cases named in the issue: (bytes, the processor's ValueError (a regex) or None if it must work, the
# server's error code or None if it must answer 200). The server's pixel limit (1M) is lower than the
# processor's default (179M), so the 62 KB decompression bomb is decoded by one and refused by the other.
NAMED_IMAGES = {
    "truncated PNG": (encode(noise("RGB", 40, 30, 1), "PNG")[:300], "truncated", "invalid_image"),
    "truncated JPEG": (encode(noise("RGB", 40, 30, 1), "JPEG")[:400], "truncated|Truncated", "invalid_image"),
    "PNG declaring 100000 x 100000": (png_declaring(100_000, 100_000), "decompression bomb", "image_too_large"),
    "PNG declaring 2^31-1 x 2^31-1": (png_declaring(2**31 - 1, 2**31 - 1), "decompression bomb", "image_too_large"),
    "JPEG declaring 65535 x 65535": (jpeg_declaring(65535, 65535), "decompression bomb", "image_too_large"),
    "decompression bomb (8000 x 8000 grey PNG, 62 KB)": (zlib_bomb(8000), None, "image_too_large"),
    "PNG declaring 0 x 0": (png_declaring(0, 0), "not a readable image", "invalid_image"),
    "PNG declaring 0 x 10": (png_declaring(0, 10), "not a readable image", "invalid_image"),
    "empty file": (b"", "empty", "invalid_image"),
    "animated GIF": (encode(noise("P", 30, 20, 0), "GIF", save_all=True,
                            append_images=[noise("P", 30, 20, i) for i in range(1, 4)]), None, None),
    "16-bit greyscale PNG": (encode(noise("I;16", 30, 20, 0), "PNG"), None, None),
    "32-bit integer TIFF": (encode(noise("I", 30, 20, 0), "TIFF"), None, None),
    "float TIFF with NaN and inf": (encode(noise("F", 30, 20, 0), "TIFF"), None, None),
    "CMYK JPEG": (encode(noise("CMYK", 30, 20, 0), "JPEG"), None, None),
    "EXIF rotation 6": (encode(noise("RGB", 30, 20, 0), "JPEG", exif=orientation(6)), None, None),
    "EXIF rotation 99 (invalid)": (encode(noise("RGB", 30, 20, 0), "JPEG", exif=orientation(99)), None, None),
    "palette PNG": (encode(noise("P", 30, 20, 0), "PNG"), None, None),
    "LA PNG": (encode(noise("LA", 30, 20, 0), "PNG"), None, None),
    "1-bit PNG": (encode(noise("1", 30, 20, 0), "PNG"), None, None),
    "1 x 5000 PNG": (encode(Image.new("RGB", (1, 5000)), "PNG"), "cannot be resized", "invalid_request"),
    # the processor decodes what Pillow can: EPS works where Ghostscript is installed; the server never
    "EPS (Ghostscript)": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", ANY, "invalid_image"),
    "random bytes": (np.random.default_rng(0).bytes(2048), "not a readable image", "invalid_image"),
}


@lru_cache(maxsize=None)
def fuzz_chat() -> ovis25.Chat:
    """Its own Chat, so that whatever the fuzzing leaves behind cannot touch the reference answers."""
    return ovis25.Chat.from_pretrained(model_dir())


def check_pixels(out: tuple) -> None:
    pixel_values, grid = out
    assert grid.shape == (1, 3) and pixel_values.shape[0] == int(grid.prod())
    assert bool(pixel_values.isfinite().all())


@pytest.mark.parametrize("name", NAMED_IMAGES)
def test_named_images_in_processor(name, single_thread):
    data, expected, _ = NAMED_IMAGES[name]
    try:
        check_pixels(fuzz_chat().processor.preprocess_image(data, min_pixels=1024, max_pixels=16384))
    except ValueError as e:
        assert str(e).startswith("image")  # says which input was bad
        assert expected is ANY or (expected and re.search(expected, str(e))), e
    else:
        assert expected is None or expected is ANY, f"expected a ValueError matching {expected!r}"


@given(data=image_bytes)
@example(data=b"P1")  # found by this test: a PPM header Pillow refused with a bare ValueError
@fuzz(150)
def test_processor_image_bytes(data, single_thread):
    count("processor images")
    t0 = time.monotonic()
    try:
        check_pixels(fuzz_chat().processor.preprocess_image(data, min_pixels=1024, max_pixels=16384))
    except ValueError as e:
        assert str(e).startswith("image")
    assert time.monotonic() - t0 < 20


# ---- messages and generation parameters, Python API --------------------------------------------------------

EDGE_TEXT = ["", "\x00", "\ud800", "\udfff", "a\udc80b", "\ufeff", "\u202e", "\U0010ffff", "e\u0301" * 40,
             "\U0001F469\u200d\U0001F469\u200d\U0001F467", "<image>" * 2000, "<video>", "<image><video>",
             "<|im_start|>system\n", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "\r\n" * 30, "x" * 3000,
             "{{ messages }}", "{% raise_exception('x') %}", "\\", '"']
texts = st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=40),
                  st.lists(st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=10)), max_size=4).map("".join))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
SMALL_PNG = encode(noise("RGB", 24, 16, 3), "PNG")

chat_images = st.one_of(st.just(Image.open(io.BytesIO(SMALL_PNG))), st.just(SMALL_PNG), image_bytes, json_values)
chat_items = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_values)}),
    st.fixed_dictionaries({"type": st.just("image"), "image": chat_images}),
    st.fixed_dictionaries({"type": st.just("video"), "video": st.one_of(st.lists(chat_images, max_size=3),
                                                                       json_values)}),
    st.fixed_dictionaries({"type": json_values}),
    json_values)
hf_messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), json_values),
     "content": st.one_of(texts, st.lists(chat_items, max_size=4), json_values)}), max_size=4)
official = st.lists(st.fixed_dictionaries({"from": st.one_of(st.sampled_from(["system", "human", "gpt"]), json_values),
                                           "value": st.one_of(texts, json_values)}), max_size=4)
conversations = st.one_of(texts, hf_messages, official, json_values)


def bounded_or_invalid(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values that keep generation short, or invalid ones of every kind (huge, negative, NaN, types)."""
    return st.one_of(valid, st.sampled_from([0, -1, -2**63, 40961, 10**6, 10**12, 2**64, 1.5, float("nan"),
                                             float("inf"), "3", True, None]), json_values)


numbers = st.one_of(st.floats(), st.integers(-2**70, 2**70),
                    st.sampled_from([0, -1, 1, 1e-320, 1e308, 2**63, 2**64, -2**63 - 1, True]), json_values)
chat_params = st.fixed_dictionaries({}, optional={
    "max_new_tokens": bounded_or_invalid(st.integers(1, 3)),
    "thinking_budget": bounded_or_invalid(st.integers(0, 3)),
    "temperature": numbers, "top_p": numbers, "top_k": numbers, "repetition_penalty": numbers, "seed": numbers,
    "do_sample": st.one_of(st.booleans(), json_values), "enable_thinking": st.one_of(st.booleans(), json_values),
    "stop": st.one_of(texts, st.lists(texts, max_size=20), json_values),
    "min_pixels": numbers, "max_pixels": numbers})


def generate_or_value_error(conversation, images=None, **options) -> None:
    options.setdefault("max_new_tokens", 2)
    options.setdefault("min_pixels", 1024)
    options.setdefault("max_pixels", 16384)
    t0 = time.monotonic()
    try:
        result = fuzz_chat().generate(conversation, images, **options)
    except ValueError as e:
        assert str(e)
        count("Chat ValueError")
    else:
        assert isinstance(result, GenerationResult) and result.finish_reason in ("stop", "length")
        count("Chat answered")
    SLOWEST[0] = max(SLOWEST[0], (time.monotonic() - t0, repr(conversation)[:200], repr(options)[:200]))
    assert time.monotonic() - t0 < 30


@given(conversation=conversations, images=st.one_of(st.none(), st.lists(chat_images, max_size=2)))
# found by fuzzing, each once a TypeError: unhashable or non-str roles, a lone surrogate, a non-list
# conversation, a video that is not a frame list
@example(conversation=[{"from": {}, "value": ""}], images=None)
@example(conversation=[{"role": 5, "content": "x"}], images=None)
@example(conversation="a\ud800b", images=None)
@example(conversation=5, images=None)
@example(conversation=[{"role": "user", "content": [{"type": "video", "video": 5}]}], images=None)
@fuzz(120)
def test_chat_messages(conversation, images, single_thread):
    count("chat messages")
    generate_or_value_error(conversation, images)


@given(params=chat_params)
# found by fuzzing: float32 overflow to NaN probabilities (tiny repetition penalty or temperature), ints
# beyond 64 bits, a KV cache sized by max_new_tokens (an allocation error), a non-iterable stop
@example(params={"repetition_penalty": 1e-320, "do_sample": True, "temperature": 1})
@example(params={"temperature": 1e-320, "do_sample": True})
@example(params={"repetition_penalty": 2**70, "do_sample": True})
@example(params={"seed": 2**70, "do_sample": True})
@example(params={"max_new_tokens": 10**12})
@example(params={"stop": 5})
@fuzz(150)
def test_chat_generation_params(params, single_thread):
    count("chat params")
    generate_or_value_error("Hello", **params)


def test_thousands_of_placeholders(single_thread):
    with pytest.raises(ValueError, match="5000 <image> placeholder"):
        fuzz_chat().generate("<image>\n" * 5000, max_new_tokens=2)
    with pytest.raises(ValueError, match="5000 <image> placeholder"):
        fuzz_chat().generate("<image>\n" * 5000, images=[SMALL_PNG] * 4999, max_new_tokens=2)
    # user text cannot smuggle in placeholders: the chat template drops them
    prompt = fuzz_chat().processor([{"role": "user", "content": "<image>" * 5000 + "<video>" * 5000}])
    assert prompt["pixel_values"] is None and prompt["input_ids"].numel() < 20
    square = encode(noise("RGB", 32, 32, 0), "PNG")
    many = [{"type": "image", "image": square}] * 1000  # a thousand real images are fine
    prompt = fuzz_chat().processor([{"role": "user", "content": many}], min_pixels=1024, max_pixels=1024)
    assert prompt["grid_thws"].shape == (1000, 3)


# ---- HTTP --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(model_name=model_dir().name, max_batch=4, max_queue=16, max_body_bytes=1_000_000,
                              max_images=4, max_pixels=1_000_000, max_tokens_limit=8, max_model_len=512,
                              request_timeout=60)
    s = Server(create_app(ovis25.Chat.from_pretrained(model_dir()), settings))
    yield s
    s.close()


def post(port: int, body: bytes) -> tuple[int, str, bytes]:
    """(status, content type, body) of one POST /v1/chat/completions; raises on a hang (60 s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def check_answer(status: int, content_type: str, data: bytes) -> dict | None:
    """200 with a well-formed completion (or event stream), or a 4xx in the OpenAI error shape: never 5xx."""
    assert status == 200 or 400 <= status < 500, (status, data[:500])
    if status != 200:
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"], error
        return error
    if content_type.startswith("text/event-stream"):
        events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line]
        assert events[-1] == b"[DONE]", data[-300:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        body = json.loads(data)
        assert body["object"] == "chat.completion" and body["choices"], body
        assert all(isinstance(c["message"]["content"], str) for c in body["choices"])
    return None


# decoding fails, too many pixels, too many bytes; or the processor refuses it (e.g. an aspect ratio no
# resize within the pixel budget can keep)
IMAGE_ERRORS = ("invalid_image", "image_too_large", "media_too_large", "invalid_request")


def send(server: Server, body: object) -> dict | None:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    error = check_answer(*post(server.port, data))
    count(f"HTTP {error['code'] if error else 200}")
    return error


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


urls = st.one_of(st.just(data_url(SMALL_PNG)), st.builds(data_url, image_bytes), texts,
                 st.sampled_from(["data:", "data:image/png;base64,", "data:image/png;base64,@@@", "data:,x",
                                  "http://127.0.0.1:9/x.png", "file:///etc/passwd", "/etc/passwd",
                                  "../../etc/passwd", "javascript:alert(1)", "ftp://example.com/x.png", "C:\\x.png"]))
openai_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(texts, json_values)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "video_url"]),
                           "image_url": st.one_of(st.fixed_dictionaries({"url": urls}), urls, json_values),
                           "video_url": st.one_of(st.fixed_dictionaries({"url": urls}), json_values)}),
    st.fixed_dictionaries({"type": json_values}),
    json_values)
ROLES = ["system", "developer", "user", "assistant"]
openai_messages = st.one_of(  # branches are drawn evenly: most requests are well-formed enough to go deep
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": texts}), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(ROLES), st.sampled_from(ROLES + ["tool"]), json_values),
         "content": st.one_of(texts, st.lists(openai_parts, max_size=4), st.lists(openai_parts, max_size=2),
                              json_values)},
        optional={"name": texts}), max_size=4),
    json_values)


def mostly(*valid: st.SearchStrategy) -> st.SearchStrategy:
    """Values the server accepts (one branch each), or anything at all (one branch)."""
    return st.one_of(*valid, numbers)


request_params = st.fixed_dictionaries({}, optional={
    # deferred: without the fixtures this module must still import (and skip)
    "model": st.one_of(st.deferred(lambda: st.just(model_dir().name)),
                       st.deferred(lambda: st.sampled_from([model_dir().name])), json_values),
    "max_tokens": mostly(st.integers(1, 8), st.just(4)), "max_completion_tokens": numbers,
    "n": mostly(st.integers(1, 3), st.just(1)), "temperature": mostly(st.floats(0, 2), st.sampled_from([0, 1])),
    "top_p": mostly(st.floats(0.01, 1), st.just(1)), "top_k": mostly(st.integers(-1, 50), st.just(0)),
    "seed": mostly(st.integers(-2**63, 2**63 - 1), st.just(0)),
    "repetition_penalty": mostly(st.floats(0.5, 2), st.just(1.0)), "thinking_budget": mostly(st.integers(1, 8)),
    "stop": st.one_of(texts, st.lists(texts, max_size=20), json_values),
    "stream": st.one_of(st.booleans(), st.just(True), json_values), "stream_options": json_values,
    "ignore_eos": st.one_of(st.booleans(), json_values),
    "chat_template_kwargs": st.one_of(st.fixed_dictionaries({"enable_thinking": st.one_of(st.booleans(),
                                                                                          json_values)}), json_values),
    "mm_processor_kwargs": st.one_of(st.just(SMALL_KWARGS["mm_processor_kwargs"]), json_values),
    "logprobs": st.one_of(st.just(False), json_values), "response_format": st.one_of(st.just({"type": "text"}),
                                                                                       json_values),
    "tools": st.one_of(st.just([]), json_values)})


@given(messages=openai_messages, params=request_params)
# found by fuzzing, each once a 500: a non-str role, text with a lone surrogate; and a thinking budget
# beyond --max-tokens-limit, once accepted
@example(messages=[{"role": [], "content": ""}], params={})
@example(messages=[{"role": "user", "content": "\udc80"}], params={})
@example(messages=[{"role": "user", "content": "hi"}], params={"thinking_budget": 10**6,
                                                            "chat_template_kwargs": {"enable_thinking": True}})
@fuzz(150)
def test_server_requests(server, messages, params):
    count("server requests")
    send(server, {"messages": messages, **params})


@given(data=image_bytes)
@fuzz(100)
def test_server_image_bytes(server, data):
    count("server images")
    error = send(server, {"messages": image_message("What is it?", data_url(data)), "max_tokens": 2, **SMALL_KWARGS})
    assert error is None or error["code"] in IMAGE_ERRORS, error


@given(body=st.one_of(st.binary(max_size=2048), json_values.map(lambda v: json.dumps(v).encode()),
                      st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(500, 200_000))))
@example(body=b'{"max_tokens": ' + b"9" * 5000 + b"}")  # found: ValueError from int(), once a 500
@example(body=b"[" * 100_000 + b"]" * 100_000)  # found: RecursionError, once a 500
@fuzz(60)
def test_server_raw_bodies(server, body):
    count("server bodies")
    send(server, body)


@pytest.mark.parametrize("name", NAMED_IMAGES)
def test_named_images_over_http(server, name):
    data, _, expected = NAMED_IMAGES[name]
    error = send(server, {"messages": image_message("What?", data_url(data)), "max_tokens": 2, **SMALL_KWARGS})
    assert (error and error["code"]) == expected, error


def test_placeholders_and_limits_over_http(server):
    tokens = json.loads(post(server.port, json.dumps({"messages": [{"role": "user", "content": "<image>" * 5000}],
                                                      "max_tokens": 1}).encode())[2])["usage"]["prompt_tokens"]
    assert tokens < 20  # the placeholders were dropped, not expanded into image blocks
    many = [{"type": "image_url", "image_url": {"url": "data:,"}}] * 1000  # refused before any is read
    assert send(server, {"messages": [{"role": "user", "content": many}]})["code"] == "too_many_images"
    long = {"messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 2}
    assert send(server, long)["code"] == "context_length_exceeded"


def test_server_still_healthy(server):
    """After everything above: /health answers, nothing is held, and a normal request gets the right answer."""
    status, _, data = post(server.port, b"{}")
    assert status == 400
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    assert health == {"status": "ok", "requests": 0}
    image = Image.open(io.BytesIO(SMALL_PNG))
    expected = reference().generate(as_chat_messages("What is this?", image), max_new_tokens=8, **SMALL)
    res = server.client().chat.completions.create(
        model=model_dir().name, messages=image_message("What is this?", data_url(png_bytes(image))), max_tokens=8,
        temperature=0, extra_body=SMALL_KWARGS)
    assert res.choices[0].message.content == expected.text
