"""The `ovis25` command end to end (subprocesses on a fixture checkpoint): one-shot answers equal
Chat.generate, thinking with a budget, --draw, video, an interactive session over stdin, and errors."""
import os
import subprocess
import sys

import av
import pytest
from PIL import Image

from conftest import FIXTURES, REPO, manifest, model_dir, reference, requires_fixtures
from ovis25 import cli
from ovis25.processing import read_video
from ovis25.reasoning import strip_think_tags

pytestmark = requires_fixtures

SMALL = {"min_pixels": 4096, "max_pixels": 25600}
SMALL_ARGS = ["--min-pixels", "4096", "--max-pixels", "25600"]


def image_path(name: str = "rgb_w100_h60"):
    return FIXTURES / manifest()["images"][name]["file"]


def ovis25_cmd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "ovis25", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_one_shot_with_image_and_draw(tmp_path):
    out = tmp_path / "boxes.png"
    run = ovis25_cmd("chat", str(model_dir()), "--image", str(image_path()), "--max-new-tokens", "12", *SMALL_ARGS,
                     "--draw", str(out), "What is in the picture?")
    assert run.returncode == 0, run.stderr
    expected = reference().generate("<image>\nWhat is in the picture?", images=[Image.open(image_path())],
                                    max_new_tokens=12, **SMALL)
    assert run.stdout == expected.text + "\n"
    assert "Loading" in run.stderr and "Loaded" in run.stderr  # load progress on stderr
    assert Image.open(out).size == Image.open(image_path()).size


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_think_with_budget(stream):
    run = ovis25_cmd("chat", str(model_dir()), "--image", str(image_path()), "--think", "--budget", "3",
                     "--max-new-tokens", "40", "--show-thinking", stream, *SMALL_ARGS, "How many stripes?")
    assert run.returncode == 0, run.stderr
    expected = reference().generate("<image>\nHow many stripes?", images=[Image.open(image_path())],
                                    enable_thinking=True, thinking_budget=3, max_new_tokens=40, **SMALL)
    assert "directly now." in expected.thinking and expected.text  # the budget closed the thinking
    assert run.stdout == strip_think_tags(expected.thinking) + "\n\n" + expected.text + "\n"  # no colors off a TTY


def test_video(tmp_path):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(7):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), (30 * i, 90, 220 - 25 * i)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    run = ovis25_cmd("chat", str(model_dir()), "--video", str(path), "--frames", "3", "--max-new-tokens", "8",
                     *SMALL_ARGS, "What changes?")
    assert run.returncode == 0, run.stderr
    expected = reference().generate("<video>\nWhat changes?", videos=[read_video(path, 3)], max_new_tokens=8, **SMALL)
    assert run.stdout == expected.text + "\n"


def test_interactive_session():
    """/image, two turns that keep the history (earlier answers verbatim), /reset, a fresh turn, /quit."""
    script = (f"/image {image_path()}\nDescribe it.\nAnd the colors?\n/think maybe\n/reset\nHello there.\n/quit\n"
              "never read\n")
    run = ovis25_cmd("chat", str(model_dir()), "--max-new-tokens", "8", *SMALL_ARGS, stdin=script)
    assert run.returncode == 0, run.stderr
    image = Image.open(image_path())
    first = reference().generate([{"from": "human", "value": "<image>\nDescribe it."}], images=[image],
                                 max_new_tokens=8, **SMALL)
    history = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": first.text},
               {"from": "human", "value": "And the colors?"}]
    second = reference().generate(history, images=[image], max_new_tokens=8, **SMALL)
    third = reference().generate("Hello there.", max_new_tokens=8, **SMALL)
    assert run.stdout == f"{first.text}\n{second.text}\n{third.text}\n"
    assert "cannot understand '/think maybe'" in run.stderr  # a bad command is reported, the session goes on
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--image", "/no/such.png", "hi"], "cannot read file"),
    (["--video", "/no/such.mp4", "hi"], "no such file"),
    (["--draw", "out.png", "hi"], "--draw needs an --image"),
])
def test_input_errors_fail_fast(args, message):
    run = ovis25_cmd("chat", str(model_dir()), *args)
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr
    assert "Loading" not in run.stderr  # found before loading the model


def test_usage_errors(tmp_path):
    run = ovis25_cmd("chat", str(tmp_path), "hi")
    assert run.returncode == 1 and "not a checkpoint directory" in run.stderr and "Traceback" not in run.stderr
    run = ovis25_cmd("chat", str(model_dir()), "--frames", "0", "hi")
    assert run.returncode == 2 and "positive integer" in run.stderr
    run = ovis25_cmd()
    assert run.returncode == 2 and "chat" in run.stderr and "serve" in run.stderr


def test_draw_puts_boxes_on_the_image(tmp_path):
    out = tmp_path / "drawn.png"
    image = Image.new("RGB", (100, 50), "white")
    cli.draw(image, "<ref>it</ref><box>(0.100,0.200),(0.500,0.800)</box> and <point>(0.9,0.5)</point>", str(out))
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == image.size
    assert drawn.getpixel((10, 30)) != (255, 255, 255)  # on the box's left edge
    assert drawn.getpixel((30, 25)) == (255, 255, 255)  # inside the box
