"""Shared test helpers: where the golden fixtures live and how to read a case."""
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("OVIS25_FIXTURES", REPO.parent / "shared" / "fixtures"))


def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


def cases(kind: str, model: str | None = None) -> list[dict]:
    """Manifest entries of one kind (optionally one model), read from the files, never hard-coded."""
    if not (FIXTURES / "manifest.json").exists():
        return []
    return [c for c in manifest()["cases"] if c["kind"] == kind and (model is None or c["model"] == model)]


def case_id(entry: dict) -> str:
    return entry["path"].removeprefix("cases/")


def load_case(entry: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    root = FIXTURES / entry["path"]
    case = json.loads((root / "case.json").read_text())
    tensors = load_file(str(root / "tensors.safetensors")) if entry["tensors"] else {}
    if case.get("pixel_values_source"):
        tensors["pixel_values"] = torch.cat(
            [load_file(str(FIXTURES / p / "tensors.safetensors"))["pixel_values"] for p in case["pixel_values_source"]]
        )
    return case, tensors


def model_dirs() -> list[Path]:
    return sorted(p for p in (FIXTURES / "models").iterdir() if (p / "config.json").exists()) if FIXTURES.exists() else []


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Fixture tolerance rule: |a - b| <= atol + rtol * |b| elementwise."""
    tol = manifest()["tolerances"].get(name, {"atol": 1e-5, "rtol": 1e-5})
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = tol["atol"] + tol["rtol"] * expected.double().abs()
    worst = (diff - bound).max().item()
    assert worst <= 0, f"{name}: max |diff| {diff.max().item():.3g} exceeds tolerance {tol}"


requires_fixtures = pytest.mark.skipif(not FIXTURES.exists(), reason=f"fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run faster on one thread, and far faster on a busy machine (no spinning thread pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def model_dir() -> Path:
    """The first fixture model: the checkpoint the CLI and server tests talk to."""
    return model_dirs()[0]


@lru_cache(maxsize=None)
def reference():
    """A separate Chat (own model copy) computing the expected one-by-one greedy answers."""
    import ovis25
    return ovis25.Chat.from_pretrained(model_dir())
