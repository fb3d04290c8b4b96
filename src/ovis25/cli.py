"""The `ovis25` command (also `python -m ovis25`).

    ovis25 chat MODEL_DIR --image cat.png "What is in the picture?"     # one answer
    ovis25 chat MODEL_DIR --think --budget 512 --image chart.png "Sum the bars."
    ovis25 chat MODEL_DIR                                               # interactive; /help lists commands
    ovis25 serve MODEL_DIR --port 8000                                  # OpenAI-compatible API
"""
from __future__ import annotations

import argparse
import importlib
from functools import partial
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from .chat import THINK_OFF_PREFACE, Chat
from .generation import EARLY_STOP_TEXT, Engine, GenerationResult
from .grounding import draw_grounding, parse_boxes, parse_points
from .processing.image import load_image
from .processing.processor import CHAT_MAX_PIXELS, CHAT_MIN_PIXELS
from .processing.video import VIDEO_MAX_PIXELS, VIDEO_NUM_FRAMES, read_video
from .reasoning import ReasoningStream, strip_think_tags

DIM, RESET = "\033[2m", "\033[0m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CACHE_ROUNDING = 256  # KV-cache lengths are rounded up so that an engine is reused over several turns
INTERACTIVE_HELP = """\
commands: /image PATH   attach an image to your next message
          /video PATH   attach a video (frames sampled with --frames)
          /think on|off thinking mode        /budget N|off  cap thinking tokens
          /reset        forget the conversation   /quit  leave (or Ctrl-D)"""


class CLIError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit status 1."""


# ---- conversation -------------------------------------------------------------------------------------------

class ChatSession:
    """A multi-turn conversation in the official from/value format, like the reference chat() with history:
    earlier assistant turns are kept verbatim and the images of all turns are sent again every turn."""

    def __init__(self, chat: Chat, enable_thinking: bool = False, thinking_budget: int | None = None,
                 max_new_tokens: int = 1024, min_pixels: int | None = None, max_pixels: int | None = None,
                 num_frames: int = VIDEO_NUM_FRAMES):
        self.chat = chat
        self.enable_thinking, self.thinking_budget = enable_thinking, thinking_budget
        self.max_new_tokens, self.num_frames = max_new_tokens, num_frames
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.engine: Engine | None = None
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = []
        self.images: list[Image.Image] = []  # of earlier turns
        self.videos: list[list[Image.Image]] = []
        self.new_images: list[Image.Image] = []  # attached to the next message
        self.new_videos: list[list[Image.Image]] = []

    def attach_image(self, path: str) -> None:
        self.new_images.append(open_image(path))

    def attach_video(self, path: str) -> None:
        self.new_videos.append(open_video(path, self.num_frames))

    @property
    def first_image(self) -> Image.Image | None:
        images = self.images + self.new_images
        return images[0] if images else None

    def pixel_budget(self, has_video: bool) -> tuple[int, int]:
        """Ovis.chat()'s defaults; with a video, the official video example's per-frame maximum."""
        max_pixels = self.max_pixels or (VIDEO_MAX_PIXELS if has_video else CHAT_MAX_PIXELS)
        min_pixels = self.min_pixels or min(CHAT_MIN_PIXELS, max_pixels)
        return min_pixels, max_pixels

    def ask(self, prompt: str, on_thinking: Callable[[str], None] = lambda s: None,
            on_text: Callable[[str], None] = lambda s: None) -> GenerationResult:
        """Answer one message, streaming deltas to the callbacks; the turn joins the history only once the
        answer is complete (an error or Ctrl-C leaves the conversation as it was)."""
        if "<image>" not in prompt and "<video>" not in prompt:  # placeholders for what was just attached
            prompt = "<image>\n" * len(self.new_images) + "<video>\n" * len(self.new_videos) + prompt
        conversation = self.history + [{"from": "human", "value": prompt}]
        images, videos = self.images + self.new_images, self.videos + self.new_videos
        min_pixels, max_pixels = self.pixel_budget(bool(videos))
        input_ids, _, pixel_values, grid_thws = self.chat.processor.format_conversation(
            conversation, images=images, videos=videos, min_pixels=min_pixels, max_pixels=max_pixels,
            generation_preface="" if self.enable_thinking else THINK_OFF_PREFACE)
        config = self.chat.generation_config.replace(
            max_new_tokens=self.max_new_tokens, enable_thinking=self.enable_thinking,
            thinking_budget=self.thinking_budget if self.enable_thinking else None)

        engine = self._engine_for(input_ids.numel(), config.max_new_tokens)
        request_id = engine.add_request(input_ids, pixel_values, grid_thws, config)
        reasoning, result = ReasoningStream(), None
        try:
            for out in engine.stream(request_id):
                on_thinking(reasoning.finish(out.result.thinking) if out.finished else reasoning.push(out.thinking))
                on_text(out.text)
                if out.finished:
                    result = out.result
        finally:  # Ctrl-C while generating
            engine.abort(request_id)
        self.history = conversation + [{"from": "gpt", "value": result.text}]
        self.images, self.videos, self.new_images, self.new_videos = images, videos, [], []
        return result

    def _engine_for(self, prompt_len: int, max_new_tokens: int) -> Engine:
        reply = max_new_tokens
        if self.enable_thinking and self.thinking_budget:  # phase 1 plus the forced text may overshoot
            reply = max(reply, self.thinking_budget + len(self.chat.processor.tokenizer.encode(EARLY_STOP_TEXT)))
        need = prompt_len + reply
        if self.engine is None or self.engine.max_len < need:
            max_len = -(-need // _CACHE_ROUNDING) * _CACHE_ROUNDING
            self.engine = Engine(self.chat.model, self.chat.processor.tokenizer, max_batch_size=1, max_len=max_len)
        return self.engine


def open_image(path: str) -> Image.Image:
    try:
        return load_image(path, name=f"image {path}")
    except ValueError as e:
        raise CLIError(str(e)) from e


def open_video(path: str, num_frames: int) -> list[Image.Image]:
    if not Path(path).is_file():
        raise CLIError(f"video {path!r}: no such file")
    try:
        return read_video(path, num_frames)
    except (ValueError, ImportError) as e:
        raise CLIError(str(e)) from e


# ---- output -------------------------------------------------------------------------------------------------

class Display:
    """Prints thinking (dimmed on a terminal, only when asked for) and then the answer."""

    def __init__(self, out: TextIO, show_thinking: bool, color: bool):
        self.out, self.show_thinking, self.color = out, show_thinking, color
        self.in_thinking = False

    def thinking(self, delta: str) -> None:
        if not delta or not self.show_thinking:
            return
        if not self.in_thinking:
            self._write(DIM if self.color else "")
            self.in_thinking = True
        self._write(delta)

    def text(self, delta: str) -> None:
        if delta:
            self.close_thinking("\n\n")
            self._write(delta)

    def end(self) -> None:
        self.close_thinking()
        self._write("\n")

    def close_thinking(self, separator: str = "") -> None:
        """Leave the thinking (restoring the terminal's colours), then write `separator`."""
        if self.in_thinking:
            self._write((RESET if self.color else "") + separator)
            self.in_thinking = False

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()


def answer(session: ChatSession, prompt: str, display: Display, stream: bool) -> GenerationResult:
    try:
        if stream:
            result = session.ask(prompt, display.thinking, display.text)
        else:
            result = session.ask(prompt)
            display.thinking(strip_think_tags(result.thinking))
            display.text(result.text)
    finally:  # interrupted or not, leave the terminal in its normal colours
        display.close_thinking()
    display.end()
    return result


def draw(image: Image.Image | None, text: str, path: str) -> None:
    if image is None:
        print("--draw: there is no image in the conversation to draw on", file=sys.stderr)
        return
    try:
        draw_grounding(image, text).save(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"--draw: cannot save {path!r}: {e}") from e
    boxes, points = len(parse_boxes(text)), len(parse_points(text))
    print(f"drew {boxes} box(es) and {points} point(s) -> {path}", file=sys.stderr)


# ---- commands -----------------------------------------------------------------------------------------------

def load_chat(args: argparse.Namespace) -> Chat:
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"{model_dir}: not a checkpoint directory (no config.json)")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CLIError(f"invalid --device {args.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    print(f"Loading {model_dir} ({dtype} on {device}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        chat = Chat.from_pretrained(model_dir, dtype=DTYPES[dtype], device=device,
                                    use_generation_config=args.generation_config)
    except Exception as e:  # whatever went wrong, say which checkpoint and why in one line
        raise CLIError(f"cannot load {model_dir}: {e}") from e
    print(f"Loaded in {time.perf_counter() - start:.1f}s.", file=sys.stderr, flush=True)
    return chat


def run_chat(args: argparse.Namespace) -> int:
    # Read the inputs before the (slow) model load so that a typo fails at once.
    images = [open_image(p) for p in args.image]
    videos = [open_video(p, args.frames) for p in args.video]
    if args.draw and args.prompt is not None and not images:
        raise CLIError("--draw needs an --image to draw on")
    if args.budget is not None and not args.think:
        print("note: --budget only applies with --think", file=sys.stderr)
    session = ChatSession(load_chat(args), args.think, args.budget, args.max_new_tokens, args.min_pixels,
                          args.max_pixels, args.frames)
    session.new_images, session.new_videos = images, videos
    tty = sys.stdout.isatty()
    stream = tty if args.stream is None else args.stream

    def display() -> Display:
        return Display(sys.stdout, args.show_thinking or tty, color=tty)

    if args.prompt is not None:
        result = answer(session, args.prompt, display(), stream)
        if args.draw:
            draw(session.first_image, result.text, args.draw)
        return 0
    return interactive(session, display, stream, args.draw)


def interactive(session: ChatSession, display: Callable[[], Display], stream: bool, draw_path: str | None) -> int:
    tty = sys.stdin.isatty()
    if tty:
        print(INTERACTIVE_HELP, file=sys.stderr)
    while True:
        try:
            line = input(">>> " if tty else "").strip()
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr)
            continue
        if not line:
            continue
        try:
            if line.startswith("/"):
                if command(session, line) == "quit":
                    return 0
                continue
            result = answer(session, line, display(), stream)
            if draw_path:
                draw(session.first_image, result.text, draw_path)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        except (CLIError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)


def command(session: ChatSession, line: str) -> str | None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return "quit"
    if name == "/help":
        print(INTERACTIVE_HELP, file=sys.stderr)
    elif name == "/reset":
        session.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif name in ("/image", "/video") and arg:
        (session.attach_image if name == "/image" else session.attach_video)(os.path.expanduser(arg))
        print(f"({name[1:]} attached to your next message)", file=sys.stderr)
    elif name == "/think" and arg in ("on", "off"):
        session.enable_thinking = arg == "on"
        print(f"(thinking {arg})", file=sys.stderr)
    elif name == "/budget" and (arg == "off" or (arg.isdigit() and int(arg) > 0)):
        session.thinking_budget = None if arg == "off" else int(arg)
        print(f"(thinking budget {arg})", file=sys.stderr)
    else:
        raise CLIError(f"cannot understand {line!r}\n{INTERACTIVE_HELP}")
    return None


def run_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServerSettings, serve
    except ImportError as e:
        raise CLIError(f"serving needs the serve extra (pip install 'ovis25[serve]'): {e}") from e
    try:
        settings = ServerSettings(
            model_name=args.served_model_name or Path(args.model_dir).resolve().name, api_key=args.api_key,
            allow_local_dir=args.allow_local_dir, allow_remote_urls=args.allow_remote_urls,
            allow_private_networks=tuple(args.allow_private_network), max_batch=args.max_batch,
            max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
            max_images=args.max_images, max_pixels=args.max_pixels, max_tokens_limit=args.max_tokens_limit,
            max_model_len=args.max_model_len, max_media_bytes=args.max_media_bytes,
            fetch_timeout=args.fetch_timeout, request_timeout=args.request_timeout or None,
            drain_timeout=args.drain_timeout)
    except ValueError as e:
        raise CLIError(str(e)) from e
    chat = load_chat(args)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"Serving {settings.model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(chat, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ---- argument parsing ---------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="checkpoint directory in the released Ovis2.5 layout")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--generation-config", action="store_true",
                   help="sampling defaults from the checkpoint's generation_config.json (default: greedy)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """-> (the `ovis25` parser, its `chat` sub-parser)."""
    parser = argparse.ArgumentParser(prog="ovis25", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = chat = commands.add_parser("chat", help="answer a prompt, or chat interactively when no prompt is given")
    add_model_args(p)
    p.add_argument("prompt", nargs="?", help="the message; without it, read messages from stdin")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH", help="attach a video file")
    p.add_argument("--frames", type=positive_int, default=VIDEO_NUM_FRAMES,
                   help=f"frames sampled uniformly from a video (default {VIDEO_NUM_FRAMES})")
    p.add_argument("--think", action="store_true", help="thinking mode")
    p.add_argument("--budget", type=positive_int, help="with --think: at most this many thinking tokens")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument("--min-pixels", type=positive_int,
                   help=f"resize budget per image/frame (default {CHAT_MIN_PIXELS})")
    p.add_argument("--max-pixels", type=positive_int,
                   help=f"default {CHAT_MAX_PIXELS}, or {VIDEO_MAX_PIXELS} per frame with a video")
    p.add_argument("--show-thinking", action="store_true", help="print thinking also when not on a terminal")
    p.add_argument("--draw", metavar="OUT.png", help="draw the answer's boxes/points on the first image")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: on a terminal)")
    p.set_defaults(func=run_chat)

    p = commands.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/chat/completions)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=non_negative_int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("OVIS25_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $OVIS25_API_KEY)")
    p.add_argument("--served-model-name", help="model id for clients (default: the directory name)")
    p.add_argument("--allow-local-dir", metavar="DIR", help="allow image/video file paths inside DIR")
    p.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image/video URLs")
    p.add_argument("--allow-private-network", action="append", default=[], metavar="CIDR",
                   help="with --allow-remote-urls: also fetch from this loopback/private network, e.g. "
                        "127.0.0.1/32 (repeatable; by default only public addresses, redirects included)")
    p.add_argument("--max-batch", type=positive_int, default=4, help="requests decoded together")
    p.add_argument("--max-queue", type=non_negative_int, default=32, help="requests waiting beyond the batch")
    p.add_argument("--max-body-bytes", type=positive_int, default=32 * 2**20)
    p.add_argument("--max-images", type=positive_int, default=8, help="images and videos per request")
    p.add_argument("--max-pixels", type=positive_int, default=4096 * 4096,
                   help="largest input image/frame (width*height) and requested pixel budget")
    p.add_argument("--max-tokens-limit", type=positive_int, default=4096, help="largest max_tokens (and default)")
    p.add_argument("--max-model-len", type=positive_int, default=8192, help="prompt + answer tokens per request")
    p.add_argument("--max-media-bytes", type=positive_int, default=64 * 2**20, help="one image/video file")
    p.add_argument("--fetch-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="with --allow-remote-urls: seconds one download may take (also each connection's timeout)")
    p.add_argument("--request-timeout", type=non_negative_float, default=600.0, metavar="SECONDS",
                   help="abort a request still running this long after it arrived, answering 504 (0: no limit)")
    p.add_argument("--drain-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish before the exit")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)

    # train / eval / demo have their own parsers: pass the rest of the command line through
    for name, help_text in (("train", "train one phase: ovis25 train RECIPE.toml [key=value ...]"),
                            ("eval", "accuracy per task: ovis25 eval MODEL_DIR --suite synth --world DIR"),
                            ("demo", "the tiny five-phase curriculum on the synthetic world")):
        p = commands.add_parser(name, help=help_text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=partial(run_module, name))
    return parser, chat


def run_module(name: str, args: argparse.Namespace) -> int:
    module = {"train": "ovis25.train.__main__", "eval": "ovis25.eval", "demo": "ovis25.demo"}[name]
    importlib.import_module(module).main(args.args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, chat_parser = build_parser()
    if argv[:1] in (["train"], ["eval"], ["demo"]):  # their own parsers see every argument, --help included
        return run_module(argv[0], argparse.Namespace(args=argv[1:]))
    if argv[:1] == ["chat"]:  # the prompt may come after options: `chat MODEL --image a.png "prompt"`
        args = chat_parser.parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # model output may hold characters the terminal cannot encode
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.func(args)
    except (CLIError, ValueError) as e:  # ValueError: bad input found while preparing a prompt
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
