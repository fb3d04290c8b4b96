"""Training stack: packing invariants, phase freezing, loss normalisation, resume, bad data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, model_dirs, requires_fixtures
from ovis25 import Ovis, Processor
from ovis25.config import Qwen3Config
from ovis25.model.llm import Qwen3ForCausalLM
from ovis25.processing import PixelBudgets
from ovis25.train import load_recipe, train
from ovis25.train.data import DataError, SampleBuilder, load_datainfo, plan_datasets
from ovis25.train.packing import collate_packed, collate_padded, pack_first_fit
from ovis25.train.phases import LAST_VIT_BLOCK, QKNormPhaseIn, param_groups, select_trainable
from ovis25.model.attention import varlen_attention
from ovis25.train.precision import autocast_dtype
from ovis25.train.trainer import forward_packed, pixel_budgets, plan_bins, qk_norm_blend

pytestmark = requires_fixtures
TINY_BUDGET = ["single_image_min_pixels=1024", "single_image_max_pixels=4096", "multiple_image_min_pixels=1024",
               "multiple_image_max_pixels=4096", "video_min_pixels=1024", "video_max_pixels=2048"]


def tiny_model_dir() -> Path:
    return next(d for d in model_dirs() if json.loads((d / "config.json").read_text())["llm_config"]
                ["tie_word_embeddings"])


def make_dataset(root: Path, n: int = 16, extra: list[dict] | None = None) -> Path:
    """Mixed single-image / two-image / text / video samples in the official format."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 30), (64, 64), (30, 90), (100, 50)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(img_dir / f"img{i}.png")
    for f in range(3):
        Image.fromarray((torch.rand(32, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(img_dir / f"f{f}.png")
    samples = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            s = {"id": i, "image": f"img{i % 4}.png",
                 "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                   {"from": "gpt", "value": f"Picture {i}."}]}
        elif kind == 1:
            s = {"id": i, "image": [f"img{i % 4}.png", f"img{(i + 1) % 4}.png"],
                 "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."},
                                   {"from": "gpt", "value": "<think>\nLook.\n</think>\n\nThey differ."}]}
        elif kind == 2:
            s = {"id": i, "conversations": [{"from": "system", "value": "Be brief."},
                                            {"from": "human", "value": "Say hi"},
                                            {"from": "gpt", "value": "hi " * (i % 5 + 1)},
                                            {"from": "human", "value": "Again"}, {"from": "gpt", "value": "hi"}]}
        else:
            s = {"id": i, "video_frames": [f"f{f}.png" for f in range(3)],
                 "conversations": [{"from": "human", "value": "<video>\nWhat moves?"},
                                   {"from": "gpt", "value": "A square."}]}
        samples.append(s)
    samples += extra or []
    (root / "meta.json").write_text(json.dumps(samples))
    (root / "datainfo.json").write_text(json.dumps(
        {"mix": {"meta_file": "meta.json", "image_dir": "images", "data_format": "conversation"}}))
    return root / "datainfo.json"


def built_samples(datainfo: Path, proc: Processor, n: int = 8):
    budgets = PixelBudgets(1024, 4096, 1024, 4096, 1024, 2048)
    builder = SampleBuilder(proc, budgets, max_length=512)
    planned = plan_datasets(load_datainfo(datainfo), builder, seed=0)[:n]
    return [builder.build(p) for p in planned]


def loss_and_grads(model: Ovis, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(batch["input_ids"], batch["pixel_values"], batch["grid_thws"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"), targets=batch["targets"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_unpacked_loss_and_gradients(tmp_path):
    model_dir = tiny_model_dir()
    proc, model = Processor.from_pretrained(model_dir), Ovis.from_pretrained(model_dir)
    samples = built_samples(make_dataset(tmp_path), proc)
    assert {s.grid_thws is None for s in samples} == {True, False}  # text-only and visual samples mixed
    assert any(s.grid_thws is not None and int(s.grid_thws[0, 0]) > 1 for s in samples)  # a video
    packed_loss, packed_grads = loss_and_grads(model, collate_packed(samples))
    one_loss, one_grads = torch.tensor(0.0), {}
    for s in samples:
        loss, grads = loss_and_grads(model, collate_packed([s]))
        one_loss += loss
        for n, g in grads.items():
            one_grads[n] = one_grads.get(n, 0) + g
    padded_loss, padded_grads = loss_and_grads(model, collate_padded(samples, pad_id=0))
    # tolerance: float32 summation order differs between one packed pass and separate passes
    torch.testing.assert_close(packed_loss, one_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)
    assert packed_grads.keys() == one_grads.keys() == padded_grads.keys()
    for n in packed_grads:
        # ... and a gradient summed over many tokens (the tied embedding's reaches ~70) carries rounding of its scale
        atol = 1e-5 * max(1.0, float(one_grads[n].abs().max()))
        torch.testing.assert_close(packed_grads[n], one_grads[n], rtol=1e-4, atol=atol, msg=n)
        torch.testing.assert_close(packed_grads[n], padded_grads[n], rtol=1e-4, atol=atol, msg=n)


def test_attention_does_not_leak_across_packed_samples(tmp_path):
    model_dir = tiny_model_dir()
    proc, model = Processor.from_pretrained(model_dir), Ovis.from_pretrained(model_dir)
    samples = built_samples(make_dataset(tmp_path), proc, n=4)
    batch = collate_packed(samples)
    kw = dict(position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    with torch.no_grad():
        base = model(batch["input_ids"], batch["pixel_values"], batch["grid_thws"], **kw).logits
        # change the text and the pixels of the last sample only
        ids = batch["input_ids"].clone()
        start = int(batch["cu_seqlens"][-2])
        text = (ids[0, start:] >= 0).nonzero()[:, 0] + start
        ids[0, text] = (ids[0, text] + 7) % 500
        pixels = batch["pixel_values"].clone()
        last = samples[-1]
        if last.pixel_values is not None:
            pixels[-last.pixel_values.shape[0]:] += 1.0
        changed = model(ids, pixels, batch["grid_thws"], **kw).logits
    assert torch.equal(base[0, :start], changed[0, :start])
    assert not torch.allclose(base[0, start:], changed[0, start:])


def test_first_fit_packing():
    bins = pack_first_fit([5, 3, 4, 2, 6, 1], max_tokens=8)
    assert bins == [[0, 1], [2, 3, 5], [4]]
    assert pack_first_fit([3, 3, 3], 9, max_samples=2) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="sample 1 has 10 tokens"):
        pack_first_fit([1, 10], 8)


def first_fit_by_scanning(lengths: list[int], max_tokens: int, max_samples: int | None) -> list[list[int]]:
    """The definition: try every open bin in order."""
    bins, room = [], []
    for i, n in enumerate(lengths):
        b = next((b for b, free in enumerate(room)
                  if n <= free and (max_samples is None or len(bins[b]) < max_samples)), None)
        if b is None:
            b = len(bins)
            bins.append([])
            room.append(max_tokens)
        bins[b].append(i)
        room[b] -= n
    return bins


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 64), max_size=200), st.integers(64, 160), st.one_of(st.none(), st.integers(1, 6)))
def test_first_fit_packing_equals_its_definition(lengths, max_tokens, max_samples):
    assert pack_first_fit(lengths, max_tokens, max_samples) == first_fit_by_scanning(lengths, max_tokens, max_samples)


def test_phase1_trains_only_last_vit_block_head_and_vet(tmp_path):
    datainfo = make_dataset(tmp_path / "data")
    cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{tmp_path / "run"}"', f'datainfo="{datainfo}"',
                             "phase=\"p1\"", "max_tokens=256", "max_steps=2", "lr=1e-2", "progress=false",
                             *TINY_BUDGET])
    final = train(cfg)
    before = load_file(str(tiny_model_dir() / "model.safetensors"))
    after = load_file(str(final / "model.safetensors"))
    n_vit = len([k for k in before if k.endswith("layer_norm1.weight")])
    trained_prefixes = (f"visual_tokenizer.vit.vision_model.encoder.layers.{n_vit - 1}.", "visual_tokenizer.head.",
                        "vte.")
    for name, t in before.items():
        changed = not torch.equal(t, after[name])
        assert changed == name.startswith(trained_prefixes), name


def test_a_misspelt_recipe_key_is_refused_in_every_phase():
    for phase in ("p1", "p2", "p3"):
        cfg = load_recipe(None, ['init="x"', f'phase="{phase}"', "lerning_rate=1e-3"])
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['lerning_rate'\] for phase"):
            cfg.validate()
    load_recipe(None, ['init="x"', 'phase="dpo"', "dpo_beta=0.2"]).validate()  # DPO's own keys pass on to it


def test_per_module_learning_rates_official_syntax():
    model = Ovis.from_pretrained(tiny_model_dir())
    lrs = select_trainable(model, f"llm:2e-5|{LAST_VIT_BLOCK}|vte:1e-3", base_lr=1e-4)
    assert lrs["llm.model.norm.weight"] == 2e-5 and lrs["vte.weight"] == 1e-3
    assert not model.visual_tokenizer.head[0].weight.requires_grad
    groups = param_groups(model, lrs, weight_decay=0.1)
    by_lr = {(g["lr"], g["weight_decay"]) for g in groups}
    assert (2e-5, 0.1) in by_lr and (2e-5, 0.0) in by_lr and (1e-3, 0.0) in by_lr and (1e-4, 0.1) in by_lr
    with pytest.raises(ValueError, match="does not name a module"):
        select_trainable(model, "llm.nope", 1e-4)
    lrs = select_trainable(model, "llm|llm.model.layers.*.self_attn.q_norm:0.1", base_lr=1e-4)  # `*`: every layer
    n_layers = len(model.llm.model.layers)
    assert [n for n, lr in lrs.items() if lr == 0.1] == [f"llm.model.layers.{i}.self_attn.q_norm.weight"
                                                       for i in range(n_layers)]
    assert lrs["llm.model.layers.0.self_attn.k_norm.weight"] == 1e-4
    with pytest.raises(ValueError, match="does not name a module"):
        select_trainable(model, "vte.*", 1e-4)


def _run_cmd(tmp: Path, datainfo: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "ovis25.train", "-", f'init="{tiny_model_dir()}"', f'out_dir="{out}"',
            f'datainfo="{datainfo}"', "max_tokens=192", "epochs=2", "save_every=2", "keep_last=2", "lr=1e-3",
            "progress=false", *TINY_BUDGET, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def _final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def test_resume_after_kill_and_crash_mid_save_matches_uninterrupted(tmp_path):
    datainfo = make_dataset(tmp_path / "data")
    ref = tmp_path / "ref"
    subprocess.run(_run_cmd(tmp_path, datainfo, ref), env=_env(), check=True, capture_output=True)
    steps = json.loads((ref / "summary.json").read_text())["steps"]
    assert steps >= 6

    # 1) the process dies while writing the checkpoint of step 4: step 2 must survive and be used
    crashed = tmp_path / "crashed"
    r = subprocess.run(_run_cmd(tmp_path, datainfo, crashed), env={**_env(), "OVIS25_FAULT": "crash-in-save-4"},
                       capture_output=True)
    assert r.returncode == 17
    assert [p.name for p in (crashed / "checkpoints").glob("step-*")] == ["step-00000002"]
    subprocess.run(_run_cmd(tmp_path, datainfo, crashed), env=_env(), check=True, capture_output=True)

    # 2) SIGKILL once a later checkpoint exists, then resume
    killed = tmp_path / "killed"
    p = subprocess.Popen(_run_cmd(tmp_path, datainfo, killed), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000004").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "final").exists()
    subprocess.run(_run_cmd(tmp_path, datainfo, killed), env=_env(), check=True, capture_output=True)

    expected = _final_weights(ref)
    for run in (crashed, killed):
        got = _final_weights(run)
        for name, t in expected.items():
            assert torch.equal(t, got[name]), f"{run.name}: {name} differs after resume"


def test_corrupt_checkpoint_is_detected_and_previous_used(tmp_path):
    from ovis25.train.state import latest_checkpoint
    datainfo = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    subprocess.run(_run_cmd(tmp_path, datainfo, out, ["max_steps=5", "keep_last=3"]), env=_env(), check=True,
                   capture_output=True)
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert latest_checkpoint(out / "checkpoints") == ckpts[-1]
    with open(ckpts[-1] / "optimizer.safetensors", "r+b") as f:  # flip bytes in the newest one
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    assert latest_checkpoint(out / "checkpoints") == ckpts[-2]


def test_bad_data_is_counted_or_fails_clearly(tmp_path):
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                               {"from": "gpt", "value": "y"}]},
        {"id": "mismatch", "image": "img0.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                                {"from": "gpt", "value": "y"}]},
        {"id": "too_long", "image": "img1.png", "conversations": [{"from": "human", "value": "word " * 400 + "<image>\nx"},
                                                                {"from": "gpt", "value": "y"}]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                                  {"from": "gpt", "value": "y"}]},
    ]
    datainfo = make_dataset(tmp_path, n=4, extra=bad)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png at all")
    # a JSONL file with a malformed line, as a second dataset
    lines = [json.dumps(json.loads((tmp_path / "meta.json").read_text())[0]), "{broken json", ""]
    (tmp_path / "more.jsonl").write_text("\n".join(lines))
    info = json.loads(datainfo.read_text())
    info["more"] = {"meta_file": "more.jsonl", "image_dir": "images", "data_format": "conversation"}
    datainfo.write_text(json.dumps(info))
    proc = Processor.from_pretrained(tiny_model_dir())
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096, 1024, 4096, 1024, 2048), max_length=256)
    planned = plan_datasets(load_datainfo(datainfo), builder, seed=0)
    assert len(planned) == 5
    counts = builder.skips.counts
    assert counts == {"missing_image": 1, "placeholder_mismatch": 1, "too_long": 1, "corrupt_image": 1,
                      "malformed_json": 1}
    assert "line 2" in builder.skips.examples["malformed_json"]
    strict = SampleBuilder(proc, PixelBudgets(1024, 4096, 1024, 4096, 1024, 2048), max_length=256, on_error="fail")
    with pytest.raises(DataError, match="missing"):
        plan_datasets(load_datainfo(datainfo), strict, seed=0)


def test_image_sizes_are_read_from_headers(tmp_path):
    for i, (size, fmt) in enumerate([((37, 91), "PNG"), ((300, 7), "PNG"), ((45, 33), "JPEG")]):
        path = tmp_path / f"{i}.{fmt.lower()}"
        Image.new("RGB", size).save(path, fmt)
        assert SampleBuilder._size(path) == size, fmt
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(DataError, match="cannot read image"):
        SampleBuilder._size(tmp_path / "folder.png")


def test_text_tail_truncation_keeps_visual_block(tmp_path):
    long_answer = [{"id": "long", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "very " * 300}]}]
    datainfo = make_dataset(tmp_path, n=0, extra=long_answer)
    proc = Processor.from_pretrained(tiny_model_dir())
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096, 1024, 4096, 1024, 2048), max_length=128)
    (planned,) = plan_datasets(load_datainfo(datainfo), builder, seed=0)
    assert planned.length == 128 and -302 in planned.input_ids  # whole image block kept, text tail cut


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not available")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distributed_matches_single_process(tmp_path, parallel):
    datainfo = make_dataset(tmp_path / "data")
    # one sample per packed row: some steps give one rank only text while the other has images; float32, since
    # bfloat16 products round differently when the batch is split differently
    common = ["max_steps=4", "save_every=0", "epochs=3", "max_samples_per_pack=1", "autocast=\"off\""]
    cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'datainfo="{datainfo}"', *common, *TINY_BUDGET])
    builder = SampleBuilder(Processor.from_pretrained(tiny_model_dir()), pixel_budgets(cfg), cfg.max_tokens)
    bins = plan_bins(plan_datasets(load_datainfo(datainfo), builder, cfg.seed), cfg)
    has_visual = [bool(b[0].visuals) for b in bins[:8]]
    assert any(has_visual[2 * s] != has_visual[2 * s + 1] for s in range(4)), "test data must mix ranks"
    single = tmp_path / "single"
    subprocess.run(_run_cmd(tmp_path, datainfo, single, common + ["grad_accum=2"]), env=_env(), check=True,
                   capture_output=True)
    multi = tmp_path / parallel
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "ovis25.train",
           *_run_cmd(tmp_path, datainfo, multi, common + ["grad_accum=1", f"parallel=\"{parallel}\""])[3:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(line)["loss"] for line in (single / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)
    wa, wb = _final_weights(single), _final_weights(multi)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-5, msg=name)


def test_lora_trains_adapters_and_exports_merged_official_checkpoint(tmp_path):
    from ovis25.train.lora import apply_lora, lora_parameters, merge_lora_state
    datainfo = make_dataset(tmp_path / "data")
    out = tmp_path / "lora"
    cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{out}"', f'datainfo="{datainfo}"',
                             "max_tokens=256", "max_steps=3", "lr=1e-2", "progress=false", "lora_rank=4",
                             'train_modules="vte"', "save_every=2", *TINY_BUDGET])
    final = train(cfg)
    before = load_file(str(tiny_model_dir() / "model.safetensors"))
    after = load_file(str(final / "model.safetensors"))
    assert set(after) == set(before)  # official key set: adapters merged away
    for name, t in before.items():
        changed = not torch.equal(t, after[name])
        is_llm_linear = name.startswith("llm.model.layers.") and "proj" in name
        assert changed == (is_llm_linear or name == "vte.weight"), name
    # the merged export computes what the adapted model computes
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    model = Ovis.from_pretrained(tiny_model_dir())
    apply_lora(model, "llm", 4, 16.0)
    state = load_file(str(ckpt / "model.safetensors"))
    state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]
    model.load_state_dict(state)
    merged = Ovis.from_pretrained(tiny_model_dir())
    merged.load_state_dict(merge_lora_state(model.state_dict(), 16.0 / 4))
    ids = torch.randint(0, 700, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in lora_parameters(model).values())


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    datainfo = make_dataset(tmp_path / "data")
    losses = {}
    for ac in (False, True):
        out = tmp_path / f"ac{ac}"
        cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{out}"', f'datainfo="{datainfo}"',
                                 "max_tokens=256", "max_steps=3", "lr=1e-3", "progress=false", "export=false",
                                 f"activation_checkpointing={str(ac).lower()}", *TINY_BUDGET])
        train(cfg)
        losses[ac] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[True]) == 3
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), losses


def test_export_has_the_official_checkpoint_layout(tmp_path):
    datainfo = make_dataset(tmp_path / "data")
    cfg = load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{tmp_path / "run"}"', f'datainfo="{datainfo}"',
                             "max_tokens=256", "max_steps=1", "progress=false", *TINY_BUDGET])
    final = train(cfg)
    official = {p.name for p in tiny_model_dir().iterdir()}
    assert {p.name for p in final.iterdir()} == official
    assert json.loads((final / "config.json").read_text()) == json.loads((tiny_model_dir() / "config.json").read_text())
    assert set(load_file(str(final / "model.safetensors"))) == set(load_file(str(tiny_model_dir() / "model.safetensors")))


def test_merge_with_init_exports_a_mix_of_the_trained_and_initial_weights(tmp_path):
    datainfo = make_dataset(tmp_path / "data")
    exported = {}
    for merge in (0.0, 0.25):
        final = train(load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{tmp_path / str(merge)}"',
                                         f'datainfo="{datainfo}"', "max_tokens=256", "max_steps=2", "lr=1e-2",
                                         "progress=false", f"merge_with_init={merge}", *TINY_BUDGET]))
        exported[merge] = load_file(str(final / "model.safetensors"))
    start = load_file(str(tiny_model_dir() / "model.safetensors"))
    assert set(exported[0.25]) == set(start)
    moved = 0
    for name, trained in exported[0.0].items():
        torch.testing.assert_close(exported[0.25][name], 0.75 * trained + 0.25 * start[name], rtol=1e-6, atol=1e-7,
                                   msg=name)
        moved += not torch.equal(trained, start[name])
    assert moved > 10
    with pytest.raises(ValueError, match="merge_with_init must be in"):
        train(load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{tmp_path / "bad"}"',
                                 f'datainfo="{datainfo}"', "merge_with_init=1"]))


def test_sharpen_visual_tokens_raises_the_softmax_temperature_in_the_saved_weights(tmp_path):
    """`sharpen_visual_tokens=x` multiplies every visual token logit by x before training: with the learning
    rate at zero the exported checkpoint's visual tokens are softmax(x * the initial logits)."""
    datainfo = make_dataset(tmp_path / "data")
    final = train(load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{tmp_path / "run"}"',
                                     f'datainfo="{datainfo}"', "max_tokens=256", "max_steps=1", "lr=1e-30",
                                     "progress=false", "sharpen_visual_tokens=3.0", *TINY_BUDGET]))
    before, after = Ovis.from_pretrained(tiny_model_dir()).eval(), Ovis.from_pretrained(final).eval()
    vit = before.config.vit_config
    pixels = torch.randn(16, vit.num_channels * vit.temporal_patch_size * vit.patch_size ** 2)
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        logits = before.visual_tokenizer.head_logits(before.visual_tokenizer.vit(pixels, grid))
        sharpened = after.visual_tokenizer(pixels, grid)
    torch.testing.assert_close(sharpened[:, :logits.shape[-1]], (3.0 * logits).softmax(-1), rtol=1e-4, atol=1e-6)
    assert sharpened.max(-1).values.mean() > logits.softmax(-1).max(-1).values.mean()
    with pytest.raises(ValueError, match="sharpen_visual_tokens must be > 0"):
        train(load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{tmp_path / "bad"}"',
                                 f'datainfo="{datainfo}"', "sharpen_visual_tokens=0"]))


def test_qk_norm_phase_in_schedule_and_blend():
    assert [qk_norm_blend(step, 80, 0.25, 0.75) for step in (0, 19, 20, 40, 59, 60, 79)] \
        == pytest.approx([0, 0, 0, 0.5, 0.975, 1, 1])
    assert [qk_norm_blend(step, 8, 0.5, 0.5) for step in (3, 4)] == [0, 1]  # a switch
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    norm = model.model.layers[0].self_attn.q_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = 3 * torch.randn(2, 5, 2, 16)
    normalised = norm(x)
    phase_in = QKNormPhaseIn(model)
    assert len(phase_in.handles) == 2  # the layer's query and key norms
    torch.testing.assert_close(norm(x), norm.weight * x)  # blend 0: lengths kept, gains applied
    phase_in.blend = 0.25
    torch.testing.assert_close(norm(x), 0.25 * normalised + 0.75 * norm.weight * x)
    phase_in.blend = 1.0
    torch.testing.assert_close(norm(x), normalised)
    phase_in.blend = 0.0
    phase_in.remove()
    torch.testing.assert_close(norm(x), normalised)  # removed: Qwen3 as saved


def test_qk_norm_phase_in_trains_differently_resumes_exactly_and_exports_plain_qwen3(tmp_path):
    """The blend follows the step, so a resumed run repeats the uninterrupted one; the export is the official
    model, which computes the normalised attention the run ended with."""
    datainfo = make_dataset(tmp_path / "data")

    def run(out: Path, *extra: str) -> Path:
        return train(load_recipe(None, [f'init="{tiny_model_dir()}"', f'out_dir="{out}"', f'datainfo="{datainfo}"',
                                        "max_tokens=256", "epochs=2", "max_steps=4", "save_every=2", "keep_last=5",
                                        "lr=1e-2", "progress=false", *TINY_BUDGET, *extra]))

    phased = load_file(str(run(tmp_path / "phased", "qk_norm_phase_in=[0.25, 0.75]") / "model.safetensors"))
    plain = load_file(str(run(tmp_path / "plain") / "model.safetensors"))
    assert not torch.equal(phased["llm.model.layers.0.self_attn.q_proj.weight"],
                           plain["llm.model.layers.0.self_attn.q_proj.weight"])
    assert phased.keys() == plain.keys()
    shutil.rmtree(tmp_path / "phased" / "final")
    assert [p.name for p in (tmp_path / "phased" / "checkpoints").iterdir()] == ["step-00000002"]
    resumed = load_file(str(run(tmp_path / "phased", "qk_norm_phase_in=[0.25, 0.75]") / "model.safetensors"))
    metrics = (tmp_path / "phased" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4, 3, 4]  # resumed from step 2
    for name, t in phased.items():
        assert torch.equal(t, resumed[name]), f"{name} differs after resume"
    for bad, message in ((["qk_norm_phase_in=[0.5]"], "must be \\[a, b\\]"),
                         (["qk_norm_phase_in=[0.8, 0.5]"], "0 <= a <= b <= 1"),
                         (["qk_norm_phase_in=[0, 1.5]"], "0 <= a <= b <= 1"),
                         (["qk_norm_phase_in=[0.4, 0.75]", "compile=true"], "recompile every step"),
                         (["qk_norm_phase_in=[0.4, 0.75]", 'phase="dpo"'], "works outside dpo/grpo")):
        with pytest.raises(ValueError, match=message):
            load_recipe(None, ["init=x", *bad]).validate()


def test_packed_attention_stays_float32_under_cpu_autocast():
    """CPU autocast would run SDPA in bfloat16 (a backward ~6x slower there): packed attention runs in float32
    instead, giving exactly the float32 result for every backend."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 10, 20, 40])
    for backend in ("grouped", "loop", "masked"):
        expected = varlen_attention(q, k, v, cu, causal=True, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, causal=True, backend=backend)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, varlen_attention(q.bfloat16().float(), k.bfloat16().float(),
                                                         v.bfloat16().float(), cu, causal=True, backend=backend))
        assert (got - expected).abs().max() < 0.05  # only the inputs' rounding to bfloat16


def test_autocast_setting():
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None and autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) in (None, torch.bfloat16)  # by this machine's measured products
    with pytest.raises(ValueError, match="autocast"):
        autocast_dtype("float16", cpu)
    with pytest.raises(ValueError, match="autocast must be one of"):
        load_recipe(None, ["init=x", "autocast=fp16"]).validate()


def test_bfloat16_autocast_trains_like_float32(tmp_path):
    """Under bfloat16 autocast the loss and gradients are float32's to bfloat16 precision, the gradients and
    weights stay float32, and a short run's losses and exported weights follow the float32 run's."""
    model_dir = tiny_model_dir()
    proc, model = Processor.from_pretrained(model_dir), Ovis.from_pretrained(model_dir)
    datainfo = make_dataset(tmp_path / "data")
    batch = collate_packed(built_samples(datainfo, proc))
    cpu = torch.device("cpu")
    grads = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad()
        loss = forward_packed(model, batch, cpu, dtype).loss
        loss.backward()
        grads[dtype] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l32, g32), (l16, g16) = grads[None], grads[torch.bfloat16]
    torch.testing.assert_close(l16, l32, rtol=1e-2, atol=0)
    assert g16.keys() == g32.keys()
    for n in g32:
        assert g16[n].dtype == torch.float32, n
        cosine = torch.nn.functional.cosine_similarity(g16[n].flatten(), g32[n].flatten(), dim=0)
        assert cosine > 0.98 or g32[n].norm() < 1e-6, (n, float(cosine))

    runs = {}
    for mode in ("off", "bfloat16"):
        out = tmp_path / mode
        final = train(load_recipe(None, [f'init="{model_dir}"', f'out_dir="{out}"', f'datainfo="{datainfo}"',
                                         "max_tokens=256", "max_steps=3", "lr=1e-3", "progress=false",
                                         f"autocast={mode}", *TINY_BUDGET]))
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = losses, load_file(str(final / "model.safetensors"))
    (losses32, w32), (losses16, w16) = runs["off"], runs["bfloat16"]
    torch.testing.assert_close(torch.tensor(losses16), torch.tensor(losses32), rtol=2e-2, atol=0)
    start = load_file(str(model_dir / "model.safetensors"))
    for n, w in w16.items():
        assert w.dtype == w32[n].dtype == start[n].dtype, n
        # both runs moved each trained weight the same way (to bfloat16 precision of the gradients)
        if not torch.equal(w32[n], start[n]):
            moved32, moved16 = (w32[n] - start[n]).flatten(), (w - start[n]).flatten()
            assert torch.nn.functional.cosine_similarity(moved16, moved32, dim=0) > 0.9, n
