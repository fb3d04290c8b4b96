"""Processing parity with the golden fixtures: pixels, resize rule, chat template, formatter, labels."""
import json
import re
from functools import lru_cache

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, assert_close, case_id, cases, load_case, manifest, model_dirs, requires_fixtures
from ovis25.processing import Processor, smart_resize
from ovis25.processing.chat import (
    DEFAULT_CHAT_TEMPLATE,
    format_conversation,
    render_chat_template,
    tokenize_with_placeholders,
)
from ovis25.processing.image import preprocess_image
from ovis25.processing.video import preprocess_video

pytestmark = requires_fixtures


@lru_cache(maxsize=None)
def processor(model: str) -> Processor:
    return Processor.from_pretrained(FIXTURES / manifest()["models"][model]["dir"])


def vit_geometries() -> list[tuple[int, int, int]]:
    """(patch_size, hidden_stride, temporal_patch_size) of every fixture model."""
    out = []
    for d in model_dirs():
        vit = json.loads((d / "config.json").read_text())["vit_config"]
        out.append((vit["patch_size"], vit["hidden_stride"], vit.get("temporal_patch_size", 1)))
    return out


def geometry_for(case: dict) -> tuple[int, int, int]:
    """Preprocess cases are model-independent: pick the model geometry that matches the case's factor/width."""
    width = case.get("tensors", {}).get("pixel_values", {}).get("shape", [None, None])[1]
    for ps, hs, tps in vit_geometries():
        if ps * hs == case["factor"] and width in (None, 3 * tps * ps * ps):
            return ps, hs, tps
    ps = round((width / 3) ** 0.5) if width else case["factor"] // 2  # no model matches: tps 1
    return ps, case["factor"] // ps, 1


def image_path(name_or_file: str) -> str:
    images = manifest()["images"]
    return str(FIXTURES / (images[name_or_file]["file"] if name_or_file in images else name_or_file))


# ---- preprocess ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", cases("preprocess"), ids=case_id)
def test_preprocess_case(entry):
    case, tensors = load_case(entry)
    ps, hs, tps = geometry_for(case)
    inp = case["input"]
    kwargs = dict(patch_size=ps, hidden_stride=hs, temporal_patch_size=tps,
                  min_pixels=case["min_pixels"], max_pixels=case["max_pixels"])
    if "video_files" in inp:
        run = lambda: preprocess_video([str(FIXTURES / f) for f in inp["video_files"]], **kwargs)  # noqa: E731
    else:
        assert Image.open(FIXTURES / inp["image_file"]).mode == inp["pil_mode_on_open"]
        if "smart_resize_hw" in case:
            assert list(smart_resize(inp["height"], inp["width"], case["factor"], case["min_pixels"],
                                     case["max_pixels"])) == case["smart_resize_hw"]
        run = lambda: preprocess_image(str(FIXTURES / inp["image_file"]), **kwargs)  # noqa: E731

    if "error" in case:
        with pytest.raises(ValueError, match=f"max_pixels={case['max_pixels']}") as err:
            run()
        assert "must be > 0" in str(err.value)
        return
    pixel_values, grid_thw = run()
    assert grid_thw.tolist() == [case["grid_thw"]] == tensors["grid_thw"].tolist()
    assert [grid_thw[0, 1].item() * ps, grid_thw[0, 2].item() * ps] == case["resized_hw"]
    assert pixel_values.dtype == torch.float32
    assert_close(pixel_values, tensors["pixel_values"], "pixel_values")


SMART_RESIZE_ROWS = [row for e in cases("smart_resize_table") for row in load_case(e)[0]["rows"]]


@pytest.mark.parametrize("row", SMART_RESIZE_ROWS,
                         ids=lambda r: f"{r['height']}x{r['width']}-{r['min_pixels']}-{r['max_pixels']}-{r['factor']}")
def test_smart_resize_table(row):
    out = smart_resize(row["height"], row["width"], row["factor"], row["min_pixels"], row["max_pixels"])
    assert list(out) == row["out_hw"]


# ---- chat template ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", cases("chat_template"), ids=case_id)
def test_chat_template_case(entry):
    case, _ = load_case(entry)
    model = case["tokenizer_model"]
    proc = processor(model)
    template_file = FIXTURES / manifest()["models"][model]["dir"] / case["template_file"]
    template = json.loads(template_file.read_text())["chat_template"]
    kw = case["render_kwargs"]  # a missing enable_thinking stays undefined
    rendered = render_chat_template(case["messages"], template, **kw)
    assert rendered == case["rendered_text"]
    assert proc.apply_chat_template(case["messages"], **kw) == rendered
    # the built-in fallback renders the same as the released template
    assert render_chat_template(case["messages"], DEFAULT_CHAT_TEMPLATE, **kw) == rendered
    assert tokenize_with_placeholders(proc.tokenizer, rendered) == case["input_ids_with_placeholders"]

    if ref := case.get("reference_formatter"):
        prompt, ids, labels = format_conversation(proc.tokenizer, ref["conversations"], ref["generation_preface"])
        assert prompt == ref["prompt_text"]
        assert ids == ref["input_ids"]
        assert set(labels) == {-100}
        assert (prompt == rendered) == ref["identical_to_template"]


# ---- chat / train: reference preprocess_inputs -----------------------------------------------------------

def visual_inputs(case: dict) -> tuple[list[str], list[list[str]]]:
    call = case["call"]
    history = (call.get("history") or {}).get("images") or []
    images = [image_path(n) for n in history + (call.get("image_files") or call.get("images") or [])]
    videos = [[image_path(f) for f in call["video_files"]]] if call.get("video_files") else []
    return images, videos


@pytest.mark.parametrize("entry", cases("chat") + cases("train"), ids=case_id)
def test_format_conversation_case(entry):
    case, tensors = load_case(entry)
    proc = processor(case["model"])
    call = case["call"]
    kwargs = case.get("preprocess_inputs_kwargs") or {
        "min_pixels": call["min_pixels"], "max_pixels": call["max_pixels"],
        "generation_preface": call.get("generation_preface")}
    images, videos = visual_inputs(case)

    prompt, _, _ = format_conversation(proc.tokenizer, case["conversations"], kwargs["generation_preface"])
    assert prompt == case["prompt_text"]
    input_ids, labels, pixel_values, grid_thws = proc.format_conversation(case["conversations"], images, videos,
                                                                          **kwargs)
    assert input_ids.tolist() == case["input_ids"] == tensors["input_ids"].flatten().tolist()
    assert labels.shape == input_ids.shape
    if "labels" in case:
        assert labels.tolist() == case["labels"]
    else:
        assert set(labels.tolist()) == {-100}
    if case["grid_thws"] is None:
        assert pixel_values is None and grid_thws is None
    else:
        assert grid_thws.tolist() == case["grid_thws"]
        assert_close(pixel_values, tensors["pixel_values"], "pixel_values")
    if "num_visual_atoms" in case:
        assert input_ids.eq(-300).sum().item() == case["num_visual_atoms"]


def as_messages(conversations: list[dict], images: list, videos: list) -> list[dict]:
    """HF messages for from/value turns: placeholders become content items (the template re-joins with `\\n`)."""
    pool = {"<image>": iter(images), "<video>": iter(videos)}
    messages = []
    for turn in conversations:
        if turn["from"] == "gpt":  # the template renders list content of assistants as empty; use a string
            messages.append({"role": "assistant", "content": turn["value"]})
            continue
        parts = [p for p in re.split(r"\n?(<image>|<video>)\n?", turn["value"]) if p]
        items = [{"type": p[1:-1], p[1:-1]: next(pool[p])} if p in pool else {"type": "text", "text": p} for p in parts]
        messages.append({"role": "system" if turn["from"] == "system" else "user", "content": items})
    return messages


@pytest.mark.parametrize("entry", cases("chat"), ids=case_id)
def test_processor_call_matches_chat_case(entry):
    """The HF-messages path gives the same pixels and grids; ids too wherever the template text is the same
    (it differs for history think blocks and mid-sentence placeholders, by design of the template)."""
    case, tensors = load_case(entry)
    proc = processor(case["model"])
    images, videos = visual_inputs(case)
    messages = as_messages(case["conversations"], images, videos)
    kw, thinking = case["preprocess_inputs_kwargs"], case["call"]["enable_thinking"]
    batch = proc(messages, enable_thinking=thinking, min_pixels=kw["min_pixels"], max_pixels=kw["max_pixels"])
    text = proc.apply_chat_template(messages, enable_thinking=thinking)
    if text == case["prompt_text"]:
        assert batch["input_ids"][0].tolist() == case["input_ids"]
    assert batch["input_ids"].shape[0] == 1
    if case["grid_thws"] is None:
        assert batch["pixel_values"] is None and batch["grid_thws"] is None
    else:
        assert batch["grid_thws"].tolist() == case["grid_thws"]
        assert_close(batch["pixel_values"], tensors["pixel_values"], "pixel_values")


@pytest.mark.parametrize("entry", cases("chat"), ids=case_id)
def test_decode_matches_chat_case(entry):
    case, _ = load_case(entry)
    tok = processor(case["model"]).tokenizer
    ids = case["generated_ids"]
    assert tok.decode(ids) == case["generated_text_raw"]
    think_end = tok.token_to_id("</think>")
    if case["call"]["enable_thinking"] and think_end in ids:
        k = ids.index(think_end) + 1
        assert tok.decode(ids[:k], skip_special_tokens=True).strip() == case["thinking"]
        ids = ids[k:]
    assert tok.decode(ids, skip_special_tokens=True).strip() == case["response"]


def test_tokenizer_special_ids_from_files():
    for name, info in manifest()["models"].items():
        tok = processor(name).tokenizer
        for token, i in info["special_token_ids"].items():
            assert tok.token_to_id(token) == i
            assert tok.encode(token) == [i]
        config = json.loads((FIXTURES / info["dir"] / "config.json").read_text())
        assert tok.eos_token_id == config["llm_config"]["eos_token_id"]
        assert len(tok) == info["tokenizer_len"]
