"""A small byte-level BPE trained on the synthetic world, written as Qwen3's tokenizer files.

The pipeline is Qwen2/Qwen3's: NFC normalizer, the Qwen2 split regex, byte-level pre-tokenizer and
decoder, BPE without unk. The learned vocabulary is a few hundred tokens; Qwen3's 26 added tokens follow
it in Qwen3's order (the first 14 special, the rest -- tool, fim, repo, `<think>` -- not special, so they
survive `skip_special_tokens`). The files have the layout of a released checkpoint, so
`ovis25.processing.Tokenizer.from_pretrained` (and, in a model dir, `Processor.from_pretrained`) reads them.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from ..processing.chat import DEFAULT_CHAT_TEMPLATE, EMPTY_THINK, IMAGE_TOKEN, ROLE_PREFIX, TURN_END, VIDEO_TOKEN

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                      "<think>", "</think>")
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE  # renders like the released Ovis2.5 template
SYSTEM_PROMPT = "You are a helpful assistant."
# Added tokens and visual placeholders never reach BPE: the tokenizer matches them before splitting.
_UNLEARNED = re.compile("|".join(map(re.escape, SPECIAL_TOKENS + PLAIN_ADDED_TOKENS + (IMAGE_TOKEN, VIDEO_TOKEN))))


def _turn(role: str, value: str) -> str:
    think = EMPTY_THINK if role == "gpt" and "</think>" not in value else ""
    return ROLE_PREFIX[role] + think + value + TURN_END


def world_corpus(world_dir: str | Path) -> list[str]:
    """Every text of a built world, each wrapped as the conversation formatter lays it out."""
    world_dir = Path(world_dir)
    manifest = json.loads((world_dir / "world.json").read_text())
    texts = [_turn("system", SYSTEM_PROMPT)]
    datainfo = json.loads((world_dir / manifest["datainfo"]).read_text())
    for entry in datainfo.values():
        for sample in json.loads((world_dir / entry["meta_file"]).read_text()):
            if entry["data_format"] == "caption":
                texts += [_turn("human", entry["caption_template"]), _turn("gpt", sample["caption"])]
            else:
                texts += [_turn(turn["from"], turn["value"]) for turn in sample["conversations"]]
    for name in manifest["files"].values():
        for line in (world_dir / name).read_text().splitlines():
            row = json.loads(line)
            texts += [_turn(turn["from"], turn["value"]) for turn in row["conversations"]]
            texts += [_turn("gpt", row[k]) for k in ("chosen", "rejected", "answer") if k in row]
    return texts


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def _token_dict(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 768) -> Path:
    """Train the BPE (`vocab_size` learned tokens at most, the 256 bytes included) on `texts` and write
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json, vocab.json,
    merges.txt and chat_template.json to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    pieces = (p for text in texts for p in _UNLEARNED.split(text) if p)
    tok.train_from_iterator(pieces, trainer)
    tok.add_special_tokens([_added(t, True) for t in SPECIAL_TOKENS])
    tok.add_tokens([_added(t, False) for t in PLAIN_ADDED_TOKENS])

    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt, as the slow-tokenizer files of a checkpoint
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS}
    _write_json(out / "added_tokens.json", ids)
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": _token_dict(EOS_TOKEN), "pad_token": _token_dict(PAD_TOKEN),
    })
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {**_token_dict(t), "special": t in SPECIAL_TOKENS} for t, i in ids.items()},
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]), "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": EOS_TOKEN, "errors": "replace",
        "extra_special_tokens": {}, "model_max_length": 131072, "pad_token": PAD_TOKEN,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return out
