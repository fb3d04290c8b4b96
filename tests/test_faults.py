"""Training under faults: the disk filling up during a checkpoint save, SIGKILL while DataLoader workers are
loading data, NaN losses; the checkpoint writing they go through; and a checkpoint carrying a pickle.
(SIGKILL once a checkpoint exists, a crash inside a save and corrupt checkpoints are in test_train.py;
shape checks and index paths of untrusted checkpoints in test_model.py.)"""
import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conftest import model_dirs, requires_fixtures
from test_train import TINY_BUDGET, _env, _final_weights, _run_cmd, make_dataset, tiny_model_dir
from ovis25 import Ovis
from ovis25.checkpoint import CheckpointError, CheckpointWriteError, write_atomically
from ovis25.processing import Tokenizer
from ovis25.train import load_recipe, train
from ovis25.train.state import latest_checkpoint, load_training_state, save_tensors

STEPS = 8  # what _run_cmd's run over make_dataset()'s 16 samples comes to (2 epochs of 4 packed rows)


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Compresses well (a small file) but still takes ~0.1 s to decode at a few megapixels."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 4, (height, width, 3))
    return Image.fromarray((np.stack([x * 7 + y, y * 3, x ^ y], -1) + noise).astype(np.uint8))


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory) -> tuple[Path, Path, dict]:
    """test_train's dataset with its images made 32 times larger (same aspect ratios, so the same packing):
    decoding them keeps DataLoader workers busy. -> (root, datainfo, final weights of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("faults")
    datainfo = make_dataset(root / "data")
    for i, path in enumerate(sorted((root / "data" / "images").glob("img*.png"))):
        width, height = Image.open(path).size
        smooth_image(width * 32, height * 32, i).save(path, compress_level=1)
    subprocess.run(_run_cmd(root, datainfo, root / "ref"), env=_env(), check=True, capture_output=True)
    return root, datainfo, _final_weights(root / "ref")


def assert_same_weights(expected: dict, got: dict, what: str) -> None:
    assert expected.keys() == got.keys()
    for name, t in expected.items():
        assert torch.equal(t, got[name]), f"{what}: {name} differs from the uninterrupted run"


@requires_fixtures
def test_disk_full_during_checkpoint_save(slow_data, tmp_path, monkeypatch, single_thread):
    """The disk fills up after 64 KiB of the step-4 checkpoint (a short write, then ENOSPC, as a full disk
    does): the run stops with an error naming the checkpoint and the file, the step-2 checkpoint is intact
    and loadable, nothing partial is left; resuming (with space again) ends with the weights of an
    uninterrupted run."""
    root, datainfo, expected = slow_data
    out = tmp_path / "run"
    cfg = load_recipe(None, _run_cmd(root, datainfo, out)[4:])  # the reference run's settings, in-process
    real_write, space, written = os.write, 64 * 1024, [0]

    def disk_fills_up(fd: int, data) -> int:
        if ".step-00000004.tmp-" not in os.readlink(f"/proc/self/fd/{fd}"):
            return real_write(fd, data)
        left = space - written[0]
        if left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, memoryview(data)[:left])
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", disk_fills_up)
    with pytest.raises(CheckpointWriteError) as err:
        train(cfg)
    assert err.value.errno == errno.ENOSPC and written[0] == space
    message = str(err.value)
    assert str(out / "checkpoints" / "step-00000004") in message and "no space left on device" in message
    assert "while writing model.safetensors" in message
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # no temp directory left
    assert latest_checkpoint(ckpts) == ckpts / "step-00000002"  # its checksums still match
    model_state, _, trainer, _ = load_training_state(ckpts / "step-00000002", 0)
    assert trainer["step"] == 2 and model_state
    assert not (out / "final").exists()

    monkeypatch.undo()  # space again
    train(cfg)
    assert_same_weights(expected, _final_weights(out), "resumed after ENOSPC")


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append((int(stat.parent.name), fields[0]))
    return found


@requires_fixtures
def test_sigkill_while_workers_load_data(slow_data, tmp_path):
    """num_workers=2: once the step-2 checkpoint exists, SIGKILL the trainer and its DataLoader workers (the
    whole process group, as when a machine is lost) at a moment a worker is running, i.e. decoding a sample;
    resuming ends with the weights of the uninterrupted (num_workers=0) run."""
    root, datainfo, expected = slow_data
    out = tmp_path / "killed"
    cmd = _run_cmd(root, datainfo, out, ["num_workers=2"])
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the run finished before a worker was caught loading data"
            assert time.monotonic() < deadline
            if (out / "checkpoints" / "step-00000002").exists():
                workers = children(proc.pid)
                if any(state == "R" for _, state in workers):
                    break
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(workers) == 2
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 2 <= done < STEPS and not (out / "final").exists()

    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    assert_same_weights(expected, _final_weights(out), f"killed after step {done}, resumed")
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial copies


def test_checkpoint_tensor_files_round_trip(tmp_path):
    """The checkpoint writer's safetensors files read back exactly with safetensors' own reader."""
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, generator=g).half(), "f64": torch.randn(3, generator=g).double(),
               "i64": torch.arange(-3, 3), "i32": torch.arange(4, dtype=torch.int32), "u8": torch.get_rng_state(),
               "i8": torch.tensor([-128, 127], dtype=torch.int8), "bool": torch.tensor([True, False, True]),
               "step": torch.tensor(7.0), "empty": torch.zeros(0, 5), "transposed": torch.randn(4, 6, generator=g).t()}
    save_tensors(tmp_path / "ours.safetensors", tensors)
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with pytest.raises(FileExistsError):  # never writes over a file
        save_tensors(tmp_path / "ours.safetensors", tensors)


def test_failed_save_keeps_the_previous_version(tmp_path):
    """Re-saving an existing checkpoint directory: a failure part-way leaves the old one as it was."""
    target = tmp_path / "step-00000004"
    write_atomically(target, lambda tmp: (tmp / "a.txt").write_text("old"))

    def fails(tmp: Path) -> None:
        (tmp / "a.txt").write_text("new, partial")
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp / "b.bin"))

    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*step-00000004: .*while writing b\.bin"):
        write_atomically(target, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    assert (target / "a.txt").read_text() == "old"


@requires_fixtures
def test_nan_loss_is_skipped_or_stops_the_run(tmp_path, single_thread):
    """NaN in the input embeddings of the bytes of '\u2603' (in the untied fixture model, so the LM head is
    clean) makes the loss NaN for exactly the two samples that contain it: with one sample per step,
    on_nan=skip drops those two updates and trains on; on_nan=stop ends the run with a clear error."""
    source = next(d for d in model_dirs()
                  if not json.loads((d / "config.json").read_text())["llm_config"]["tie_word_embeddings"])
    poisoned = tmp_path / "poisoned"
    shutil.copytree(source, poisoned)
    state = load_file(str(poisoned / "model.safetensors"))
    snowman = Tokenizer.from_pretrained(source).encode("\u2603")
    state["llm.model.embed_tokens.weight"][snowman] = math.nan
    save_file(state, str(poisoned / "model.safetensors"))
    snow = [{"id": f"snow{i}", "conversations": [{"from": "human", "value": "Draw a \u2603."},
                                                 {"from": "gpt", "value": "Here: \u2603"}]} for i in range(2)]
    datainfo = make_dataset(tmp_path / "data", n=8, extra=snow)

    def run(on_nan: str) -> Path:
        out = tmp_path / on_nan
        train(load_recipe(None, [f'init="{poisoned}"', f'out_dir="{out}"', f'datainfo="{datainfo}"', "epochs=1",
                                 "max_tokens=192", "max_samples_per_pack=1", "save_every=0", "lr=1e-3",
                                 "progress=false", f'on_nan="{on_nan}"', *TINY_BUDGET]))
        return out

    out = run("skip")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)  # 10 steps, the 2 NaN ones skipped
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    trained = load_file(str(out / "final" / "model.safetensors"))
    clean_rows = [i for i in range(state["llm.model.embed_tokens.weight"].shape[0]) if i not in snowman]
    for name, t in trained.items():  # the skipped updates spread no NaN; the other steps did train
        finite = t[clean_rows] if name == "llm.model.embed_tokens.weight" else t
        assert finite.isfinite().all(), name
    assert any(not torch.equal(t, state[name]) for name, t in trained.items())

    with pytest.raises(FloatingPointError, match=r"step \d+: loss is nan; stopping \(on_nan=stop\)"):
        run("stop")
    assert not (tmp_path / "stop" / "final").exists()


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@requires_fixtures
def test_pickled_weights_are_never_unpickled(tmp_path):
    """A checkpoint whose weights are a pickle (pytorch_model.bin, and one disguised as model.safetensors) is
    refused without unpickling it: the payload never runs."""
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps({"weights": _Payload(marker)})
    for name, error, match in (("pytorch_model.bin", CheckpointError, "no model.safetensors"),
                               ("model.safetensors", SafetensorError, "deserializing header")):
        path = tmp_path / name.replace(".", "-")
        shutil.copytree(model_dirs()[0], path)
        (path / "model.safetensors").unlink()
        (path / name).write_bytes(payload)
        with pytest.raises(error, match=match):
            Ovis.from_pretrained(path)
        assert not marker.exists(), f"{name}: the pickle ran"
    pickle.loads(payload)  # the payload is live: unpickled, it does run
    assert marker.exists()


def test_a_second_run_on_a_held_directory_stops_at_once(tmp_path):
    """Two runs on one directory would interleave their checkpoints: the second stops with the holder's pid,
    and a holder killed with SIGKILL leaves nothing behind that blocks the next run."""
    from ovis25.checkpoint import DirectoryInUseError, exclusive_directory
    from ovis25.demo import run_demo

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ovis25.checkpoint import exclusive_directory\n"
         f"with exclusive_directory({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        datainfo = make_dataset(tmp_path / "data", n=4)
        cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{out}"', f'datainfo="{datainfo}"',
                                 "progress=false", "max_steps=1", *TINY_BUDGET])
        held = re.escape(f"{out} is in use by another training run (pid {holder.pid})")
        with pytest.raises(DirectoryInUseError, match=held):
            train(cfg)
        assert not (out / "checkpoints").exists() and not (out / "config.json").exists()
        r = subprocess.run(_run_cmd(tmp_path, datainfo, out), env=_env(), capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.strip().endswith("give this one another directory"), r.stderr
        with pytest.raises(DirectoryInUseError, match="in use by another demo"):
            run_demo("run", "ci", runs_dir=tmp_path)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # neither touched the directory
    finally:
        holder.kill()
        holder.wait()
    with exclusive_directory(out):  # the killed holder's lock went with it
        with pytest.raises(DirectoryInUseError, match=f"pid {os.getpid()}"):  # held within one process too
            with exclusive_directory(out):
                pass
    train(cfg)
    assert (out / "final" / "model.safetensors").exists()
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match="a_file: not a directory, so it cannot hold a training run"):
        train(replace(cfg, out_dir=str(tmp_path / "a_file")))
    assert (tmp_path / "a_file").read_text() == "mine"
