"""The world's BPE (Qwen3 layout) and a fresh tiny checkpoint built on it."""
import json
from pathlib import Path

import pytest
import torch

import ovis25
from ovis25.processing import Tokenizer
from ovis25.processing.chat import render_chat_template
from ovis25.processing.tokenizer import TOKENIZER_FILES
from ovis25.synth import build_world, init_weights, tiny_config, world_corpus, write_model_dir
from ovis25.synth.tokenizer import PLAIN_ADDED_TOKENS, SPECIAL_TOKENS

from conftest import FIXTURES

FIXTURE_MODEL = FIXTURES / "models" / "tiny-tied"
needs_fixture = pytest.mark.skipif(not FIXTURE_MODEL.is_dir(), reason="fixture checkpoint not available")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    build_world(out, seed=0, sizes="ci")
    return out


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("ckpt") / "init", world / "tokenizer")


def test_round_trips_the_corpus(world):
    tok = Tokenizer.from_pretrained(world / "tokenizer")
    corpus = world_corpus(world)
    assert len(corpus) > 100
    for text in corpus + ["unseen text: Ünïcode ✓ 🎉\r\n\t  x"]:
        assert tok.decode(tok.encode(text)) == text


def test_small_vocab_and_qwen3_added_tokens(world):
    tok = Tokenizer.from_pretrained(world / "tokenizer")
    base = tok._tokenizer.get_vocab_size(with_added_tokens=False)
    assert 256 < base <= 768
    added = SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    assert len(added) == 26 and added[0] == "<|endoftext|>" and added[-2:] == ("<think>", "</think>")
    assert [tok.token_to_id(t) for t in added] == list(range(base, base + 26))
    assert tok.special_ids == set(range(base, base + len(SPECIAL_TOKENS)))  # 14 special, as Qwen3
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    ids = tok.encode("<|im_start|>assistant\n<think>\nok\n</think>\n\n3<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.token_to_id("<think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nok\n</think>\n\n3"
    # frequent words are single tokens
    assert len(tok.encode(" circles")) == 1 and len(tok.encode("How many")) == 2


@needs_fixture
def test_same_files_and_pipeline_as_a_released_checkpoint(world):
    ours, ref = world / "tokenizer", FIXTURE_MODEL
    assert {f for f in TOKENIZER_FILES + ("chat_template.json",) if (ref / f).exists()} <= \
        {p.name for p in ours.iterdir()}
    a, b = (json.loads((d / "tokenizer.json").read_text()) for d in (ours, ref))
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert a[key] == b[key], key
    assert {k: v for k, v in a["model"].items() if k not in ("vocab", "merges")} == \
        {k: v for k, v in b["model"].items() if k not in ("vocab", "merges")}
    strip = lambda tokens: [{k: v for k, v in t.items() if k != "id"} for t in tokens]  # noqa: E731
    assert strip(a["added_tokens"]) == strip(b["added_tokens"])
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        x, y = (json.loads((d / name).read_text()) for d in (ours, ref))
        assert x.keys() == y.keys(), name
        assert {k: v for k, v in x.items() if k not in ("added_tokens_decoder", "chat_template")} == \
            {k: v for k, v in y.items() if k not in ("added_tokens_decoder", "chat_template")}
    assert (ours / "merges.txt").read_text().startswith("#version: 0.2\n")
    # our template renders exactly as the released one
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": "<think>\nhm\n</think>\n\n3"}, {"role": "user", "content": "And?"}]
    released = json.loads((ref / "chat_template.json").read_text())["chat_template"]
    ours_t = json.loads((ours / "chat_template.json").read_text())["chat_template"]
    for thinking in (None, False):
        assert render_chat_template(messages, ours_t, True, thinking) == \
            render_chat_template(messages, released, True, thinking)


def test_tiny_config():
    cfg = tiny_config(639)
    assert cfg.llm_config.vocab_size == 640 and cfg.llm_config.tie_word_embeddings
    assert cfg.vit_config.full_attention_blocks == set(range(cfg.vit_config.num_hidden_layers))
    assert cfg.vit_config.image_size // cfg.vit_config.patch_size == 4
    assert cfg.llm_config.num_attention_heads * cfg.llm_config.head_dim == 128


def test_init_weights():
    model = ovis25.Ovis.from_config(tiny_config(640))
    init_weights(model, std=0.02, seed=1)
    params = dict(model.named_parameters())
    emb = params["llm.model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 0.002 and model.llm.lm_head.weight is emb
    assert all((p == 1).all() for n, p in params.items() if "norm" in n and n.endswith("weight"))
    assert all((p == 0).all() for n, p in params.items() if n.endswith("bias"))
    other = ovis25.Ovis.from_config(tiny_config(640))
    init_weights(other, std=0.02, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


def test_model_dir_loads_and_runs(world, model_dir):
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
            "chat_template.json", *TOKENIZER_FILES} <= files
    model = ovis25.Ovis.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 10e6
    proc = ovis25.Processor.from_pretrained(model_dir)
    assert proc.tokenizer.eos_token_id == model.config.llm_config.eos_token_id

    qa = json.loads((world / "meta" / "qa.json").read_text())
    video = next(r for r in qa if "video_frames" in r)
    pair = next(r for r in qa if isinstance(r.get("image"), list))
    for row in (qa[0], video, pair):
        images = [] if "video_frames" in row else ([row["image"]] if isinstance(row["image"], str) else row["image"])
        videos = [[world / "images" / f for f in row["video_frames"]]] if "video_frames" in row else []
        ids, labels, pixels, grids = proc.format_conversation(
            row["conversations"], images=[world / "images" / p for p in images], videos=videos,
            min_pixels=32 * 32, max_pixels=128 * 128)
        assert (labels >= 0).any() and grids is not None
        out = model(ids[None], pixels, grids, labels=labels[None])
        assert out.logits.shape == (1, len(ids), model.config.llm_config.vocab_size)
        assert torch.isfinite(out.loss)
