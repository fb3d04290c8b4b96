"""Checkpoint IO in the released Ovis2.5 layout (safetensors only, never pickle).

Loading builds the model on the meta device and assigns tensors read one at a time from memory-mapped
safetensors files, so a 9B checkpoint is never held twice. Every tensor's name and shape is checked
before it is read. Saving writes a complete directory next to the target and renames it into place,
so an interrupted save never damages the previous checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import OvisConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_KEY = "llm.lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it claims to hold."""


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32}


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; index entries may not leave the directory."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = []
        root = path.resolve()
        for name in dict.fromkeys(weight_map.values()):
            file = (path / name).resolve()
            if file.parent != root or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard {name!r} is not a .safetensors file inside the checkpoint")
            if not file.exists():
                raise CheckpointError(f"{index}: shard {name} is missing")
            files.append(file)
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_state_dict(path: str | Path, expected: dict[str, torch.Size], dtype: torch.dtype | None,
                    device: str | torch.device = "cpu", optional: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Read tensors named in `expected`, checking names and shapes before loading any data."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key in optional and key not in expected:
                    continue
                if key not in expected:
                    raise CheckpointError(f"{file.name}: unexpected tensor {key!r} (not part of this model)")
                shape = torch.Size(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(f"{file.name}: tensor {key!r} has shape {tuple(shape)}, "
                                          f"the config expects {tuple(expected[key])}")
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    missing = sorted(set(expected) - set(state) - set(optional))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    return state


def load_model(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = OvisConfig.from_json(path)
    with torch.device("meta"):
        model = cls(config)
    tied = config.llm_config.tie_word_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {TIED_KEY} if tied else set()
    if tied:
        expected.pop(TIED_KEY)
    state = read_state_dict(path, expected, dtype, device, optional)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.llm.tie_weights()
    return model.eval()


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    return shards + [current]


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. the disk is full); what was there before is unchanged."""


def write_atomically(target: str | Path, fill) -> None:
    """Create directory `target` by calling fill(tmp_dir) and renaming; the old target survives a crash.

    An OSError on the way (ENOSPC, EIO, ...) removes the partial copy and is raised as a
    CheckpointWriteError that names the target and the file being written."""
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old.exists() and not target.exists():
                os.replace(old, target)  # put the previous one back
            raise
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)  # the renames themselves reach the disk
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            where = f" while writing {Path(e.filename).name}" if e.filename else ""
            raise CheckpointWriteError(e.errno, f"cannot write checkpoint {target}: {what}{where}; nothing was "
                                                "replaced and the partial copy was removed") from e
        raise


class DirectoryInUseError(RuntimeError):
    """Another process holds the run directory (`exclusive_directory`)."""


@contextmanager
def exclusive_directory(path: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold `path/.lock` for the block, so that a second run started on the same directory stops at once
    instead of interleaving its checkpoints with this one's. An advisory flock: the OS releases it when the
    process ends, however it ends. Where flock is missing (Windows), the block runs unguarded."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: not a directory, so it cannot hold a {what}")
    path.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield path
        return
    with open(path / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise DirectoryInUseError(f"{path} is in use by another {what} ({holder}): wait for it to end, "
                                      "or give this one another directory") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.llm_config.tie_word_embeddings:
        state.pop(TIED_KEY, None)  # as the reference: the shared matrix is stored once, as embed_tokens
    return state


def save_model(model: nn.Module, path: str | Path, max_shard_bytes: int = 5 * 2**30, processor=None,
               generation_config: dict | None = None) -> None:
    """Write config.json, safetensors (sharded with an index when large) and, if given, processor files."""
    state = model_state_for_saving(model)

    def fill(tmp: Path) -> None:
        model.config.save(tmp / "config.json")
        shards = _shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        if processor is not None:
            processor.save_pretrained(tmp)

    write_atomically(path, fill)
