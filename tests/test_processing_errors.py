"""Processing: clear errors on bad input, layout/edge properties, video files, save/load round trip."""
import io
import json
import shutil
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import model_dirs, requires_fixtures
from ovis25.processing import Processor, smart_resize
from ovis25.processing.chat import DEFAULT_CHAT_TEMPLATE, format_conversation, render_chat_template
from ovis25.processing.image import load_image, preprocess_image
from ovis25.processing.video import preprocess_video, read_video, sample_indices


@lru_cache(maxsize=None)
def proc() -> Processor:
    return Processor.from_pretrained(model_dirs()[0])


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


BUDGET = dict(min_pixels=1024, max_pixels=16384)

# ---- bad inputs ------------------------------------------------------------------------------------------


@requires_fixtures
def test_placeholder_count_mismatch():
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}]
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        proc().format_conversation(conv, images=[noise_image(64, 64), noise_image(64, 64)], **BUDGET)
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        proc().format_conversation(conv, **BUDGET)
    messages = [{"role": "user", "content": [{"type": "text", "text": "no image here"}]}]
    assert proc()(messages)["pixel_values"] is None


@requires_fixtures
def test_images_and_videos_cannot_mix():
    frames = [noise_image(64, 64, i) for i in range(2)]
    with pytest.raises(ValueError, match="mix"):
        proc().format_conversation([{"from": "human", "value": "<image> and <video>"}],
                                   images=[frames[0]], videos=[frames], **BUDGET)
    with pytest.raises(ValueError, match="mix"):  # placeholders in different turns
        conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"},
                {"from": "human", "value": "<video>"}]
        proc().format_conversation(conv, images=[frames[0]], videos=[frames], **BUDGET)
    with pytest.raises(ValueError, match="mix"):
        items = [{"type": "image", "image": frames[0]}, {"type": "video", "video": frames}]
        proc()([{"role": "user", "content": items}])


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"definitely not an image, just text", "not a readable image"),
    (png_bytes(noise_image(64, 64))[:600], "truncated|not a readable image"),
])
def test_bad_image_bytes(data, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_image(data)
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"image 3: .*({match})"):
        load_image(path, name="image 3")


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(ValueError, match="cannot read file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="expected a PIL image, a path or bytes"):
        load_image(12345)


@requires_fixtures
def test_truncated_png_through_processor():
    data = png_bytes(noise_image(96, 96))
    conv = [{"from": "human", "value": "<image>\n<image>\nhi"}]
    with pytest.raises(ValueError, match="image 1: "):
        proc().format_conversation(conv, images=[noise_image(64, 64), data[: len(data) * 2 // 3]], **BUDGET)


def test_decompression_bomb_limit_is_configurable():
    bomb = png_bytes(Image.new("RGB", (3000, 3000)))  # tiny file, 9M pixels once decoded
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="max_image_pixels=1000000"):
        load_image(bomb, max_image_pixels=1_000_000)
    assert load_image(bomb, max_image_pixels=10_000_000).size == (3000, 3000)
    with pytest.raises(ValueError, match="image: .*max_image_pixels=100"):
        preprocess_image(noise_image(20, 20), max_image_pixels=100, **BUDGET)


@requires_fixtures
def test_processor_bomb_limit():
    small = Processor.from_pretrained(model_dirs()[0], max_image_pixels=50 * 50)
    with pytest.raises(ValueError, match="image 0: 64x64 = 4096 pixels exceeds max_image_pixels=2500"):
        small.format_conversation([{"from": "human", "value": "<image>"}], images=[noise_image(64, 64)], **BUDGET)


@pytest.mark.parametrize("min_pixels, max_pixels, match", [
    (5000, 4000, r"min_pixels \(5000\) must be <= max_pixels \(4000\)"),
    (0, 4000, "min_pixels must be a positive integer"),
    (1024, -1, "max_pixels must be a positive integer"),
    (1024, 4096.0, "max_pixels must be a positive integer"),
])
def test_bad_budgets(min_pixels, max_pixels, match):
    with pytest.raises(ValueError, match=match):
        preprocess_image(noise_image(64, 64), min_pixels=min_pixels, max_pixels=max_pixels)
    with pytest.raises(ValueError, match=match):
        smart_resize(64, 64, 32, min_pixels, max_pixels)


def test_budget_giving_a_zero_side():
    assert smart_resize(500, 37, 32, 1024, 4096) == (224, 0)
    with pytest.raises(ValueError, match=r"image 2: 37x500 .*max_pixels=4096 .*gives 0x224"):
        preprocess_image(noise_image(37, 500), min_pixels=1024, max_pixels=4096, name="image 2")
    with pytest.raises(ValueError, match="video: .*max_pixels=4096"):
        preprocess_video([noise_image(37, 500)] * 2, min_pixels=1024, max_pixels=4096)


def test_bad_geometry_and_video_input():
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        preprocess_image(noise_image(64, 64), patch_size=0, **BUDGET)
    with pytest.raises(ValueError, match="non-empty list of frames"):
        preprocess_video([], **BUDGET)
    with pytest.raises(ValueError, match="non-empty list of frames"):
        preprocess_video(noise_image(64, 64), **BUDGET)
    with pytest.raises(ValueError, match="video frame 1: "):
        preprocess_video([noise_image(64, 64), b"junk"], **BUDGET)


@requires_fixtures
def test_bad_conversations_and_messages():
    tok = proc().tokenizer
    with pytest.raises(ValueError, match="turn 1: 'from' must be one of"):
        format_conversation(tok, [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}])
    with pytest.raises(ValueError, match="turn 0: 'value' must be a str"):
        format_conversation(tok, [{"from": "human", "value": None}])
    with pytest.raises(ValueError, match="non-empty list"):
        format_conversation(tok, [])
    with pytest.raises(ValueError, match="images must be a list"):
        proc().format_conversation([{"from": "human", "value": "<image>"}], images=noise_image(64, 64))
    with pytest.raises(ValueError, match="Invalid role"):
        proc().apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="Invalid content type"):
        proc().apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="message 0 item 0: a 'image' item needs a 'image' field"):
        proc()([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="message 1: expected a dict with 'role' and 'content'"):
        proc().apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match="syntax error"):
        render_chat_template([{"role": "user", "content": "a"}], "{% if %}")


@requires_fixtures
def test_tokenizer_errors_and_special_skipping():
    tok = proc().tokenizer
    with pytest.raises(ValueError, match="not in the tokenizer vocabulary"):
        tok.token_to_id("<no_such_token>")
    with pytest.raises(ValueError, match="negative ids"):
        tok.decode([tok.eos_token_id, -300])
    ids = tok.encode("<think>\nx\n</think>\n\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\nhi"
    assert tok.decode(ids) == "<think>\nx\n</think>\n\nhi<|im_end|>"


# ---- properties of the resize rule and the patch layout -------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 4000), w=st.integers(1, 4000), factor=st.sampled_from([28, 32]),
       lo=st.integers(1, 600_000), extra=st.integers(0, 3_000_000))
def test_smart_resize_properties(h, w, factor, lo, extra):
    hi = lo + extra
    out_h, out_w = smart_resize(h, w, factor, lo, hi)
    assert out_h % factor == 0 and out_w % factor == 0 and out_h >= 0 and out_w >= 0
    big_enough = h >= factor and w >= factor and max(h, w) / min(h, w) <= 200 and h * w >= 4 * lo
    if big_enough:  # cannot take the upscaling branch, so the budget's upper bound holds
        assert out_h * out_w <= hi
    if out_h and out_w and lo <= out_h * out_w <= hi and max(out_h, out_w) / min(out_h, out_w) <= 200:
        assert smart_resize(out_h, out_w, factor, lo, hi) == (out_h, out_w)  # a fitting size is a fixed point


def test_patch_order_and_channel_layout():
    ps, hs = 4, 2
    image = noise_image(16, 8)  # exactly 2x4 patches: no resize happens at this budget
    pixel_values, grid = preprocess_image(image, patch_size=ps, hidden_stride=hs, min_pixels=128, max_pixels=128)
    assert grid.tolist() == [[1, 2, 4]]
    x = (np.asarray(image).astype(np.float64) / 255).astype(np.float32) * 2 - 1
    # rows: 2x2 groups row-major, then (0,0), (0,1), (1,0), (1,1) inside a group
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for row, (r, c) in enumerate(order):
        patch = x[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps]  # (ps, ps, 3)
        expected = torch.from_numpy(patch.transpose(2, 0, 1).reshape(-1).copy())  # channel-major
        torch.testing.assert_close(pixel_values[row], expected, atol=1e-6, rtol=0)


def test_temporal_patch_size_pads_with_last_frame():
    frames = [noise_image(32, 32, seed) for seed in range(3)]
    pv, grid = preprocess_video(frames, patch_size=16, hidden_stride=2, temporal_patch_size=2, **BUDGET)
    assert grid.tolist() == [[2, 2, 2]] and pv.shape == (8, 3 * 2 * 16 * 16)
    single = [preprocess_video([f], patch_size=16, hidden_stride=2, **BUDGET)[0] for f in frames]
    rows = pv.view(8, 3, 2, 256)  # (row, channel, time, pixels)
    torch.testing.assert_close(rows[:4, :, 0], single[0].view(4, 3, 256))
    torch.testing.assert_close(rows[:4, :, 1], single[1].view(4, 3, 256))
    torch.testing.assert_close(rows[4:, :, 0], single[2].view(4, 3, 256))
    torch.testing.assert_close(rows[4:, :, 1], single[2].view(4, 3, 256))  # padded with the last frame
    image_pv, image_grid = preprocess_image(frames[0], temporal_patch_size=2, **BUDGET)
    assert image_grid.tolist() == [[1, 2, 2]]
    torch.testing.assert_close(image_pv.view(4, 3, 2, 256)[:, :, 1], single[0].view(4, 3, 256))


def test_video_frames_share_first_frame_size():
    pv, grid = preprocess_video([noise_image(64, 32), noise_image(100, 100, 1)], **BUDGET)
    assert grid.tolist() == [[2, 2, 4]] and pv.shape[0] == 16


@requires_fixtures
def test_image_sources_are_equivalent(tmp_path):
    image = noise_image(70, 50)
    path = tmp_path / "x.png"
    image.save(path)
    ref = proc().preprocess_image(image, **BUDGET)
    for source in (path, str(path), path.read_bytes()):
        out = proc().preprocess_image(source, **BUDGET)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# ---- video files ------------------------------------------------------------------------------------------


def write_video(path, n: int) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = np.full((48, 64, 3), i * 20, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_read_video_samples_uniformly(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 10)
    frames = read_video(path, num_frames=4)
    assert len(frames) == 4 and all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    levels = [np.asarray(f).mean() for f in frames]  # frame i has brightness ~20*i
    assert [round(v / 20) for v in levels] == sample_indices(10, 4) == [0, 3, 6, 9]
    assert len(read_video(path, num_frames=50)) == 10
    with pytest.raises(ValueError, match="num_frames"):
        read_video(path, num_frames=0)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(tmp_path / "bad.mp4")


@requires_fixtures
def test_processor_call_with_video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 6)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "Hi"}]}]
    batch = proc()(messages, min_pixels=1024, max_pixels=4096, num_frames=3)
    assert batch["grid_thws"].tolist() == [[3, 4, 4]]  # 48x64 rounds to 64x64
    ids = batch["input_ids"][0].tolist()
    assert ids.count(-303) == 1 and ids.count(-304) == 1 and ids.count(-300) == 3 * 16 // 4


# ---- save / load ------------------------------------------------------------------------------------------


@requires_fixtures
def test_save_pretrained_round_trip(tmp_path):
    proc().save_pretrained(tmp_path)
    again = Processor.from_pretrained(tmp_path)  # no config.json here: geometry comes from preprocessor_config
    assert (again.patch_size, again.hidden_stride, again.temporal_patch_size) == \
        (proc().patch_size, proc().hidden_stride, proc().temporal_patch_size)
    assert again.chat_template == proc().chat_template
    text = "<|im_start|>user\nHello <think>x</think><|im_end|>\n"
    assert again.tokenizer.encode(text) == proc().tokenizer.encode(text)
    assert again.tokenizer.eos_token_id == proc().tokenizer.eos_token_id
    image = noise_image(90, 60)
    assert torch.equal(again.preprocess_image(image, **BUDGET)[0], proc().preprocess_image(image, **BUDGET)[0])


@requires_fixtures
def test_builtin_template_when_checkpoint_has_none(tmp_path):
    src = model_dirs()[0]
    for name in ("tokenizer.json", "config.json", "preprocessor_config.json", "special_tokens_map.json"):
        shutil.copyfile(src / name, tmp_path / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = Processor.from_pretrained(tmp_path)
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "Hi"}]}]
    expected = proc().apply_chat_template(messages, enable_thinking=False)
    assert bare.apply_chat_template(messages, enable_thinking=False) == expected


def test_missing_geometry_is_reported(tmp_path):
    if not model_dirs():
        pytest.skip("fixtures not found")
    shutil.copyfile(model_dirs()[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="patch_size not found"):
        Processor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        Processor.from_pretrained(tmp_path / "missing")
