"""Resumable training checkpoints: model, optimizer, scheduler, data position and RNG, safetensors only.

A checkpoint is a directory `step-00000042/` written next to its final place and renamed into it (see
`checkpoint.write_atomically`), with a `manifest.json` of SHA-256 sums written last. Loading verifies
the sums, so a partial or corrupt checkpoint is detected and the previous one is used instead. A save that
fails (a full disk) raises `CheckpointWriteError` naming the checkpoint and file, and leaves the earlier
checkpoints as they were; the partial copy of a save killed outright is removed by the next save.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import write_atomically

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_WRITE_CHUNK = 16 * 2**20


def write_all(fd: int, data, path: Path) -> None:
    """os.write until all of `data` (any buffer) is written; a failure (ENOSPC, EIO) names `path`."""
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.write(fd, view[:_WRITE_CHUNK])
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e
        view = view[n:]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory: unlike `save_file`, no
    second copy of everything (optimizer state is twice the model), and every byte goes through one
    `write_all` that reports the file a write failed on."""
    assert sys.byteorder == "little"  # safetensors data is little-endian
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))  # aligned, as save_file
    header, offset = {}, 0
    for name, t in items:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {t.dtype}, which is not saved")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, struct.pack("<Q", len(head)) + head, path)
        for _, t in items:
            write_all(fd, t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), path)
    finally:
        os.close(fd)


def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pname, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pname}::{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pname, key = flat.rsplit("::", 1)
        state.setdefault(pname, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(ckpt_dir: Path, model_state: dict[str, torch.Tensor], optim_state: dict, trainer: dict,
                        rng_states: list[dict[str, torch.Tensor]]) -> None:
    """Write one checkpoint directory atomically (rank 0; `rng_states` gathered from every rank)."""
    opt_tensors, opt_meta = flatten_optimizer_state(optim_state)
    for stale in ckpt_dir.parent.glob(".step-*.tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)

    def fill(tmp: Path) -> None:
        save_tensors(tmp / "model.safetensors", model_state)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        for rank, rng in enumerate(rng_states):
            save_tensors(tmp / f"rng-rank{rank}.safetensors", rng)
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2))
        if os.environ.get("OVIS25_FAULT") == f"crash-in-save-{trainer['step']}":  # fault injection for tests
            os._exit(17)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({f: _sha256(tmp / f) for f in files}, indent=2))

    write_atomically(ckpt_dir, fill)


def verify(ckpt_dir: Path) -> bool:
    manifest = ckpt_dir / MANIFEST
    if not manifest.exists():
        return False
    try:
        sums = json.loads(manifest.read_text())
        return all((ckpt_dir / f).exists() and _sha256(ckpt_dir / f) == s for f, s in sums.items())
    except (OSError, json.JSONDecodeError):
        return False


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; bad ones are reported and skipped."""
    if not root.exists():
        return None
    for ckpt in sorted(root.glob("step-*"), reverse=True):
        if verify(ckpt):
            return ckpt
        log.warning("checkpoint %s is incomplete or corrupt; trying an older one", ckpt)
    return None


def load_training_state(ckpt_dir: Path, rank: int) -> tuple[dict, dict, dict, dict[str, torch.Tensor]]:
    model_state = load_file(str(ckpt_dir / "model.safetensors"))
    optim = unflatten_optimizer_state(load_file(str(ckpt_dir / "optimizer.safetensors")),
                                      json.loads((ckpt_dir / "optimizer.json").read_text()))
    trainer = json.loads((ckpt_dir / "trainer.json").read_text())
    rng_file = ckpt_dir / f"rng-rank{rank}.safetensors"
    rng = load_file(str(rng_file)) if rng_file.exists() else {}
    return model_state, optim, trainer, rng


def prune_checkpoints(root: Path, keep_last: int) -> None:
    ckpts = sorted(root.glob("step-*"))
    for old in ckpts[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, torch.Tensor]:
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
