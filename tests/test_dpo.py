"""DPO: the loss against its closed form, beta limits, the frozen reference, learning on held-out pairs,
bad pairs, resume, and torchrun (FSDP) against a single process."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, requires_fixtures
from ovis25 import Ovis, Processor
from ovis25.processing import PixelBudgets
from ovis25.constants import IGNORE_ID
from ovis25.train import load_recipe, train
from ovis25.train.data import DataError, SampleBuilder, load_datainfo, plan_datasets
from ovis25.train.dpo import REF_CACHE, PairBins, dpo_loss, pair_logps, pair_planner
from ovis25.train.phases import frozen_copy

pytestmark = [requires_fixtures, pytest.mark.usefixtures("single_thread")]
TINY = FIXTURES / "models" / "tiny-tied"
BUDGET = ["single_image_min_pixels=1024", "single_image_max_pixels=4096"]
WORDS = "red blue green cat dog sun moon tree car house fish bird".split()
HELD_OUT_WORDS = "lamp rock star leaf".split()


# ---- the loss -----------------------------------------------------------------------------------------------
def test_loss_and_gradient_match_closed_form():
    pc = torch.tensor([-10.0, -5.0, -7.5], requires_grad=True)
    pr = torch.tensor([-9.0, -6.0, -7.5], requires_grad=True)
    rc, rr = torch.tensor([-9.5, -5.5, -8.0]), torch.tensor([-9.0, -5.0, -7.0])
    n_c = torch.tensor([4, 2, 5])
    beta, eps, w = 0.3, 0.1, 0.5
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta, eps, n_c, w)
    loss.sum().backward()
    for i in range(3):
        z = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        sig = 1 / (1 + math.exp(-z))
        expected = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig) + w * (-pc[i].item() / n_c[i].item())
        assert loss[i].item() == pytest.approx(expected, rel=1e-6)
        # dL/dz = -(1 - eps) (1 - sig) + eps sig;  dz/dpc = beta, dz/dpr = -beta;  the NLL adds -w / |c|
        dz = -(1 - eps) * (1 - sig) + eps * sig
        assert pc.grad[i].item() == pytest.approx(beta * dz - w / n_c[i].item(), rel=1e-5)
        assert pr.grad[i].item() == pytest.approx(-beta * dz, rel=1e-5)
        assert chosen_reward[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-6)
        assert rejected_reward[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-6)


def test_beta_limits():
    """beta -> 0: loss -> log 2 and gradient -> 0 (any label smoothing); large beta: hinge beta * max(0, -delta)."""
    delta = torch.tensor([2.0, -1.0, 0.5])  # (pc - rc) - (pr - rr)
    for eps in (0.0, 0.2):
        for beta in (1e-2, 1e-4, 1e-6):  # |loss - log 2| and |grad| shrink in proportion to beta
            pc = delta.clone().requires_grad_(True)
            loss, _, _ = dpo_loss(pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta, eps)
            loss.sum().backward()
            assert ((loss.detach() - math.log(2)).abs() <= beta * delta.abs() + 1e-7).all()
            assert (pc.grad.abs() <= beta).all()
    beta = 50.0
    pc = delta.clone().requires_grad_(True)
    loss, _, _ = dpo_loss(pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), beta)
    loss.sum().backward()
    hinge = beta * torch.clamp(-delta, min=0)
    torch.testing.assert_close(loss.detach(), hinge, atol=1e-9 + 1e-3, rtol=1e-3)
    # gradient: 0 for pairs ranked right, -beta (a constant push) for the wrong one
    torch.testing.assert_close(pc.grad, torch.tensor([0.0, -beta, 0.0]), atol=1e-6, rtol=1e-6)


def test_reference_model_gets_no_gradient(tmp_path):
    proc, model = Processor.from_pretrained(TINY), Ovis.from_pretrained(TINY)
    ref = frozen_copy(model)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=512)
    pairs = plan_datasets(load_datainfo(write_pairs(tmp_path, 4, seed=0)), builder, 0,
                          plan=pair_planner(builder, 512))
    batch = PairBins([pairs], builder)[0]
    pc, pr, n_c = pair_logps(model, batch, torch.device("cpu"))
    with torch.no_grad():
        rc, rr, _ = pair_logps(ref, batch, torch.device("cpu"))
    torch.testing.assert_close(pc.detach(), rc)  # the copy is the initial policy
    loss, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, 0.0, n_c, 1.0)
    loss.sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not ref.training


# ---- data ---------------------------------------------------------------------------------------------------
def write_pairs(root: Path, n: int, seed: int, words=WORDS, extra: list[dict] | None = None,
                images: bool = True, name: str = "pairs") -> Path:
    """Synthetic preferences: chosen answers `Yes, <w> is nice.`, rejected `No. <w>?`; every third prompt
    (or all with images="all") carries an image, and every fourth chosen answer has a think block."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "images/a.png")
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        w = rng.choice(words)
        chosen = f"Yes, {w} is nice." if i % 4 else f"<think>\nIt is {w}.\n</think>\n\nYes, {w} is nice."
        s = {"id": f"{name}{i}", "question": f"Tell me about {w}.", "chosen": chosen, "rejected": f"No. {w}?"}
        if images == "all" or (images and i % 3 == 0):
            s = {"id": f"{name}{i}", "image": "a.png", "chosen": chosen, "rejected": f"No. {w}?",
                 "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                   {"from": "human", "value": f"<image>\nWhat about {w}?"}]}
        samples.append(s)
    samples += extra or []
    (root / f"{name}.jsonl").write_text("\n".join(json.dumps(s) for s in samples))
    info = root / f"{name}_datainfo.json"
    info.write_text(json.dumps({name: {"meta_file": f"{name}.jsonl", "image_dir": "images",
                                       "data_format": "conversation"}}))
    return info


def heldout_logps(model_dir: Path, datainfo: Path) -> tuple[torch.Tensor, torch.Tensor]:
    proc, model = Processor.from_pretrained(model_dir), Ovis.from_pretrained(model_dir)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=2048)
    pairs = plan_datasets(load_datainfo(datainfo), builder, 0, plan=pair_planner(builder, 2048))
    with torch.no_grad():
        chosen, rejected, _ = pair_logps(model, PairBins([pairs], builder)[0], torch.device("cpu"))
    return chosen, rejected


def recipe(out: Path, datainfo: Path, *extra: str) -> list[str]:
    return [f'init="{TINY}"', f'out_dir="{out}"', f'datainfo="{datainfo}"', 'phase="dpo"', "max_tokens=320",
            "lr=2e-3", "warmup_ratio=0", "progress=false", "dpo_beta=0.5", *BUDGET, *extra]


def test_dpo_improves_heldout_reward_accuracy_and_margin(tmp_path):
    train_info = write_pairs(tmp_path, 48, seed=1)
    heldout = write_pairs(tmp_path, 16, seed=2, words=HELD_OUT_WORDS, name="heldout")
    final = train(load_recipe(None, recipe(tmp_path / "run", train_info, "max_steps=8", "dpo_nll_weight=0.1")))
    c0, r0 = heldout_logps(TINY, heldout)
    c1, r1 = heldout_logps(final, heldout)
    beta = 0.5
    rewards = beta * ((c1 - c0) - (r1 - r0))  # implicit reward margin, the initial model as reference
    acc_before, acc_after = 0.0, float((rewards > 0).float().mean())  # before: all ties
    margin_before, margin_after = float((c0 - r0).mean()), float((c1 - r1).mean())
    print(f"\nheld-out reward accuracy {acc_before:.2f} -> {acc_after:.2f}; "
          f"log-prob margin chosen - rejected {margin_before:.2f} -> {margin_after:.2f}")
    assert acc_after >= 0.9
    assert margin_after > margin_before + 5.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(math.log(2) + 0.1 * rows[0]["nll"], rel=1e-5)  # policy == reference
    assert rows[-1]["reward_accuracy"] > 0.9 and rows[-1]["loss"] < rows[0]["loss"]
    before = load_file(str(TINY / "model.safetensors"))
    assert set(load_file(str(final / "model.safetensors"))) == set(before)  # official checkpoint layout


def test_bad_pairs_are_counted_or_fail(tmp_path):
    bad = [{"id": "no_chosen", "question": "q", "rejected": "r"},
           {"id": "empty_rejected", "question": "q", "chosen": "c", "rejected": "  "},
           {"id": "ends_with_gpt", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "chosen": "c", "rejected": "r"},
           {"id": "pairs0", "question": "duplicate id", "chosen": "c", "rejected": "r"},
           {"id": "long", "question": "q", "chosen": "word " * 200, "rejected": "word " * 200}]
    info = write_pairs(tmp_path, 4, seed=0, extra=bad)
    proc = Processor.from_pretrained(TINY)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=320)
    pairs = plan_datasets(load_datainfo(info), builder, 0, plan=pair_planner(builder, 320))
    assert len(pairs) == 4
    assert builder.skips.counts == {"missing_chosen": 1, "missing_rejected": 1, "bad_prompt": 1, "duplicate_id": 1,
                                    "too_long": 1}
    assert "no_chosen" in builder.skips.examples["missing_chosen"]
    strict = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=320, on_error="fail")
    with pytest.raises(DataError, match="no_chosen"):
        plan_datasets(load_datainfo(info), strict, 0, plan=pair_planner(strict, 320))


def test_response_only_is_supervised(tmp_path):
    """Earlier gpt turns of the prompt are context: only the final (response) turn carries labels, with the
    official rules (a response without a think block gets the empty one, unsupervised)."""
    info = write_pairs(tmp_path, 1, seed=0, images="all")
    sample = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert sample["chosen"].startswith("<think>") and "<think>" not in sample["rejected"]
    proc = Processor.from_pretrained(TINY)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=512)
    (pair,) = plan_datasets(load_datainfo(info), builder, 0, plan=pair_planner(builder, 512))
    for side, planned in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        supervised = [t for t in planned.labels if t != IGNORE_ID]
        assert proc.tokenizer.decode(supervised) == sample[side] + "<|im_end|>"


# ---- resume and reference cache -----------------------------------------------------------------------------
def test_resume_gives_same_final_weights_and_cache_matches_model(tmp_path):
    info = write_pairs(tmp_path, 24, seed=3)
    common = ["max_steps=4", "save_every=2", "max_samples_per_pack=3", "grad_accum=2"]
    full = tmp_path / "full"
    train(load_recipe(None, recipe(full, info, *common, 'dpo_ref="cache"')))
    assert (full / REF_CACHE).exists() and len(load_file(str(full / REF_CACHE))) == 24
    # "interrupted" after step 2: a fresh run directory holding only the step-2 checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints", resumed / "checkpoints")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-00000002"]
    train(load_recipe(None, recipe(resumed, info, *common, 'dpo_ref="cache"')))
    a, b = load_file(str(full / "final/model.safetensors")), load_file(str(resumed / "final/model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 2  # steps 3 and 4 only
    # the frozen-copy reference gives the same trajectory as the cached log-probs
    model_ref = tmp_path / "model_ref"
    train(load_recipe(None, recipe(model_ref, info, *common, "save_every=0", "export=false")))
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (full, model_ref)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# ---- distributed --------------------------------------------------------------------------------------------
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not available")
@pytest.mark.parametrize("parallel,ref", [("fsdp", "model"), ("ddp", "cache")])
def test_torchrun_matches_single_process(tmp_path, parallel, ref):
    """2 ranks x grad_accum 1 == 1 process x grad_accum 2: same pairs per step, same loss trajectory. FSDP also
    shards the frozen reference; DDP with the cache splits the reference pass over the ranks."""
    info = write_pairs(tmp_path, 24, seed=4, images="all")  # FSDP: every rank's rows must run the ViT
    common = ["max_steps=3", "max_samples_per_pack=2", "save_every=0", f'dpo_ref="{ref}"', 'autocast="off"']  # exact
    single = tmp_path / "single"
    train(load_recipe(None, recipe(single, info, *common, "grad_accum=2")))
    multi = tmp_path / parallel
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    port = 29500 + os.getpid() % 1000 + (7 if parallel == "fsdp" else 9)
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port), "-m", "ovis25.train", "-",
           *recipe(multi, info, *common, "grad_accum=1", f'parallel="{parallel}"')]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["pairs"] == y["pairs"] == 4
        for key in ("loss", "chosen_reward", "rejected_reward"):
            assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, a, b)
    if ref == "cache":
        assert load_file(str(single / REF_CACHE)).keys() == load_file(str(multi / REF_CACHE)).keys()
    wa, wb = load_file(str(single / "final/model.safetensors")), load_file(str(multi / "final/model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-5, msg=name)
