"""A thin wrapper over a `tokenizers.Tokenizer` that reads the HF checkpoint's tokenizer files."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _token_content(value) -> str | None:
    """Special tokens are written either as plain strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Byte-level BPE tokenizer with HF semantics: `encode` adds no special tokens but recognises added
    tokens in the text; `decode(skip_special_tokens=True)` drops only tokens flagged special (so the
    non-special `<think>`/`</think>` survive)."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str | None, pad_token: str | None,
                 bos_token: str | None = None, source_dir: Path | None = None):
        self._tokenizer = tokenizer
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.source_dir = source_dir
        self.eos_token_id = self._optional_id(eos_token, "eos_token")
        self.pad_token_id = self._optional_id(pad_token, "pad_token")
        self.bos_token_id = self._optional_id(bos_token, "bos_token")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{model_dir}: no tokenizer.json (only fast-tokenizer checkpoints are supported)")
        tokenizer = _HFTokenizer.from_file(str(path))
        config = read_json(model_dir / "tokenizer_config.json")
        special_map = read_json(model_dir / "special_tokens_map.json")

        # Tokens declared in the side files but missing from tokenizer.json are added, as HF does.
        declared = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
        for token, i in read_json(model_dir / "added_tokens.json").items():
            declared.setdefault(int(i), {"content": token, "special": False})
        for i, entry in sorted(declared.items()):
            known = tokenizer.token_to_id(entry["content"])
            if known is None:
                tokenizer.add_tokens([AddedToken(
                    entry["content"], single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", False),
                    special=entry.get("special", False))])
                known = tokenizer.token_to_id(entry["content"])
            if known != i:
                raise ValueError(f"{model_dir}: added token {entry['content']!r} has id {known} in tokenizer.json "
                                 f"but {i} in tokenizer_config.json/added_tokens.json")

        def special(name: str) -> str | None:
            return _token_content(config.get(name)) or _token_content(special_map.get(name))

        return cls(tokenizer, special("eos_token"), special("pad_token"), special("bos_token"), model_dir)

    def _optional_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        i = self._tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{field} {token!r} is not in the tokenizer vocabulary")
        return i

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers refuses str that is not valid Unicode (lone surrogates)
            bad = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
            raise ValueError(f"text contains a lone surrogate (U+{ord(text[bad]):04X} at index {bad}), "
                             "which is not valid Unicode") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"decode got negative ids {sorted({i for i in ids if i < 0})}: visual placeholders "
                             "are not text tokens")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self._tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer vocabulary")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self._tokenizer.id_to_token(i)

    @property
    def special_ids(self) -> set[int]:
        """Ids of added tokens flagged special (what skip_special_tokens removes)."""
        return {i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Copy the checkpoint's tokenizer files (or write tokenizer.json when built in memory)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.source_dir is None:
            self._tokenizer.save(str(out_dir / "tokenizer.json"))
            config = {"eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.bos_token}
            (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
            return
        for name in TOKENIZER_FILES:
            src = self.source_dir / name
            if src.exists() and src.resolve() != (out_dir / name).resolve():
                shutil.copyfile(src, out_dir / name)
