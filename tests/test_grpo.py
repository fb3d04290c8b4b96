"""GRPO and rewards: advantages, the clipped objective and k3 KL by hand, reward functions, rollouts,
learning a toy verifiable task, bad data, resume, the OpenAI backend and a torchrun (FSDP) run."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, requires_fixtures
from ovis25 import Ovis, Processor
from ovis25.processing import PixelBudgets
from ovis25.generation import EARLY_STOP_TEXT, GenerationConfig
from ovis25.train import load_recipe, train
from ovis25.train.data import DataError, SampleBuilder, load_datainfo, plan_datasets
from ovis25.train.grpo import (GRPOOptions, OpenAIRollouts, engine_rollouts, group_advantages, grpo_token_loss,
                               openai_messages, prompt_planner, response_scales)
from ovis25.train.rewards import REWARDS, RewardScorer, answer_text, parse_rewards, register_reward

pytestmark = [requires_fixtures, pytest.mark.usefixtures("single_thread")]
TINY = FIXTURES / "models" / "tiny-tied"
TARGET = "cloud"


# ---- the objective ------------------------------------------------------------------------------------------
def test_group_advantages_formula():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [0.1, 0.1, 0.1, 0.1], [2.0, 5.0, -1.0, 0.0]],
                     dtype=torch.float64)
    a = group_advantages(r)
    for i in (0, 3):
        mean = sum(r[i].tolist()) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r[i].tolist()) / 4)
        torch.testing.assert_close(a[i], (r[i] - mean) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4)) and torch.equal(a[2], torch.zeros(4))  # identical rewards
    single = group_advantages(torch.tensor([[0.7]]))  # a group of one
    assert torch.equal(single, torch.zeros(1, 1))
    assert group_advantages(torch.empty(0, 4)).shape == (0, 4)
    assert torch.isfinite(a).all()


def test_clipped_objective_and_k3_kl_match_hand_computation():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2], requires_grad=True)
    old = torch.tensor([-1.0, -2.5, -0.45, -2.0, -1.25])
    ref = torch.tensor([-1.1, -2.0, -0.4, -2.5, -1.0])
    adv = torch.tensor([1.0, 2.0, -1.0, -0.5, 0.0])
    eps, beta = 0.2, 0.05
    loss, clipped, kl = grpo_token_loss(logp, old, adv, eps, ref, beta)
    loss.sum().backward()
    for t in range(5):
        rho = math.exp(logp[t].item() - old[t].item())
        a = adv[t].item()
        obj = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        d = ref[t].item() - logp[t].item()
        k3 = math.exp(d) - d - 1
        assert loss[t].item() == pytest.approx(-obj + beta * k3, rel=1e-5, abs=1e-7)
        assert kl[t].item() == pytest.approx(k3, rel=1e-5, abs=1e-7) and kl[t].item() >= 0
        cut = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
        assert bool(clipped[t]) == cut
        # gradient: -rho A where the ratio term is active, 0 where clipped; k3' = 1 - exp(d)
        grad = (0.0 if cut else -rho * a) + beta * (1 - math.exp(d))
        assert logp.grad[t].item() == pytest.approx(grad, rel=1e-5, abs=1e-7)
    assert clipped.tolist() == [False, True, False, True, False]  # rho = 1.65 (A > 0) and 0.37 (A < 0) are cut
    _, _, none = grpo_token_loss(logp, old, adv, eps)
    assert none is None


# ---- rewards ------------------------------------------------------------------------------------------------
def test_builtin_rewards():
    think = "<think>\nLet me see.\n</think>\n\n"
    assert REWARDS["exact"]("q", think + "  Paris. ", "paris") == 1.0
    assert REWARDS["exact"]("q", "Paris is it", "paris") == 0.0
    assert REWARDS["exact"]("q", "<think>\nParis\n</think>\n\nLondon", "paris") == 0.0  # the thinking is not the answer
    assert REWARDS["number"]("q", think + "So the total is 1,234.5 apples", "1234.5") == 1.0
    assert REWARDS["number"]("q", "x = 3.00001", "3") == 1.0  # relative tolerance 1e-4
    assert REWARDS["number"]("q", "x = 3.1", "3") == 0.0 and REWARDS["number"]("q", "none", "3") == 0.0
    for answer in ("B", "(B)", "B. blue", "The answer is (B).", "answer: b"):
        assert REWARDS["choice"]("q", answer, "B") == 1.0, answer
    assert REWARDS["choice"]("q", "C", "(B) blue") == 0.0 and REWARDS["choice"]("q", "a cat", "A") == 0.0
    box = "<box>(0.100,0.100),(0.500,0.500)</box>"
    assert REWARDS["iou"]("q", "It is " + box, box) == pytest.approx(1.0)
    half = "<box>(0.100,0.100),(0.500,0.300)</box>"  # half of the reference box
    assert REWARDS["iou"]("q", half, box) == pytest.approx(0.5)
    assert REWARDS["iou"]("q", f"[{half},{half}]", box) == pytest.approx(0.25)  # two boxes for one: halved
    three_quarters, tenth = "<box>(0.1,0.1),(0.5,0.4)</box>", "<box>(0.1,0.1),(0.5,0.14)</box>"
    assert REWARDS["iou50"]("q", three_quarters, box) == 1.0 and REWARDS["iou50"]("q", tenth, box) == 0.0
    assert REWARDS["iou"]("q", "no box", box) == 0.0
    assert REWARDS["format"]("q", think + "42", "") == 1.0
    assert REWARDS["format"]("q", think, "") == 0.0  # empty answer
    assert REWARDS["format"]("q", "42", "") == 0.0 and REWARDS["format"]("q", "<think>a</think>b</think>c", "") == 0.0
    assert REWARDS["length_penalty"]("q", "x" * 500, "") == pytest.approx(-0.25)
    assert REWARDS["length_penalty"]("q", "x" * 10**5, "") == -1.0
    assert answer_text(think + " 7 ") == "7"


def test_reward_specs_compose_and_a_raising_reward_scores_zero_and_is_counted(caplog):
    @register_reward("test_boom")
    def boom(prompt: str, response: str, reference: str) -> float:
        raise RuntimeError("bad reward code")

    specs = parse_rewards(["exact:1.0", "format:0.5", "test_boom:2"])
    assert specs == [("exact", 1.0), ("format", 0.5), ("test_boom", 2.0)]
    scorer = RewardScorer()
    total, parts = scorer(specs, "q", "<think>\nx\n</think>\n\nyes", "Yes.", sample_id="data/17")
    assert total == pytest.approx(1.5) and parts == {"exact": 1.0, "format": 1.0, "test_boom": 0.0}
    scorer(specs, "q", "no", "yes", sample_id="data/18")
    assert scorer.errors == {"test_boom": 2}
    assert "data/17" in caplog.text and "bad reward code" in caplog.text  # reported with the sample id
    assert parse_rewards("exact") == [("exact", 1.0)]
    with pytest.raises(ValueError, match="unknown reward"):
        parse_rewards(["nope:1"])
    with pytest.raises(ValueError, match="not a number"):
        parse_rewards(["exact:high"])


# ---- data ---------------------------------------------------------------------------------------------------
def write_prompts(root: Path, samples: list[dict]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).save(root / "images/a.png")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(s) for s in samples))
    (root / "datainfo.json").write_text(json.dumps(
        {"prompts": {"meta_file": "prompts.jsonl", "image_dir": "images", "data_format": "conversation"}}))
    return root / "datainfo.json"


def test_bad_prompts_are_counted_or_fail(tmp_path):
    good = {"id": "ok", "image": "a.png", "answer": 3,
            "conversations": [{"from": "human", "value": "<image>\nHow many?"}]}
    bad = [{"id": "empty", "question": "q", "answer": "  "}, {"id": "missing", "question": "q"},
           {"id": "reward", "question": "q", "answer": "a", "reward": "nope"},
           {"id": "no_image", "image": "gone.png", "answer": "a",
            "conversations": [{"from": "human", "value": "<image>\nq"}]},
           {"id": "long", "question": "word " * 300, "answer": "a"}]
    info = write_prompts(tmp_path, [good] + bad)
    proc = Processor.from_pretrained(TINY)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=200)
    (p,) = plan_datasets(load_datainfo(info), builder, 0, plan=prompt_planner(builder, [("exact", 1.0)], False))
    assert p.answer == "3" and p.key == "prompts/ok" and p.sample.kind == "single_image"
    assert proc.tokenizer.decode(p.sample.input_ids[-12:]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert builder.skips.counts == {"empty_answer": 2, "bad_reward": 1, "missing_image": 1, "too_long": 1}
    assert "empty" in builder.skips.examples["empty_answer"]
    strict = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=200, on_error="fail")
    with pytest.raises(DataError, match="empty"):
        plan_datasets(load_datainfo(info), strict, 0, plan=prompt_planner(strict, [("exact", 1.0)], False))


def test_a_share_of_prompts_is_rolled_out_with_thinking(tmp_path):
    rows = [{"id": f"p{i}", "question": f"q{i}", "answer": "a"} for i in range(40)]
    info = write_prompts(tmp_path, rows)
    proc = Processor.from_pretrained(TINY)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=200)
    opts = GRPOOptions(grpo_thinking_share=0.25)
    prompts = plan_datasets(load_datainfo(info), builder, 0, plan=prompt_planner(builder, [("exact", 1.0)], opts.thinks))
    thinking = [p.thinking for p in prompts]
    assert 0 < sum(thinking) < len(prompts) and thinking == [opts.thinks(p.key) for p in prompts]  # fixed per prompt
    empty = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for p in prompts:  # the open assistant turn: thinking prompts leave the think block to the model
        text = proc.tokenizer.decode(p.sample.input_ids[-12:])
        assert text.endswith("<|im_start|>assistant\n" if p.thinking else empty)
    assert opts.generation_config().enable_thinking and not GRPOOptions().generation_config().enable_thinking
    assert all(GRPOOptions(grpo_thinking=True).thinks(p.key) for p in prompts)
    with pytest.raises(ValueError, match="grpo_thinking_share"):
        GRPOOptions(grpo_thinking_share=1.5).validate()


# ---- rollouts -----------------------------------------------------------------------------------------------
def test_engine_rollouts_keep_forced_thinking_budget_ids_out_of_training():
    proc, model = Processor.from_pretrained(TINY), Ovis.from_pretrained(TINY).eval()
    ids, _, _, _ = proc.format_conversation([{"from": "human", "value": "Think."}], generation_preface="")
    prompt = SimpleNamespace(input_ids=ids, pixel_values=None, grid_thws=None)
    config = GenerationConfig(max_new_tokens=12, do_sample=True, enable_thinking=True, thinking_budget=3)
    (group,) = engine_rollouts(model, proc.tokenizer, [prompt], config, [[1, 2, 3]], max_batch=2)
    forced = proc.tokenizer.encode(EARLY_STOP_TEXT)
    for r in group:
        assert len(r.token_ids) == len(r.sampled) and r.sampled[:3] == [True] * 3
        if proc.tokenizer.token_to_id("</think>") not in r.token_ids[:3]:  # the budget forced the early stop
            assert r.token_ids[3:3 + len(forced)] == forced and not any(r.sampled[3:3 + len(forced)])
            assert all(r.sampled[3 + len(forced):])
    assert group[0].token_ids != group[1].token_ids  # different seeds
    # per prompt: the same prompt with thinking off gets no budget, so nothing is forced
    thinking, plain = engine_rollouts(model, proc.tokenizer, [prompt, prompt], config, [[1, 2, 3]] * 2, max_batch=6,
                                      thinking=[True, False])
    assert [r.token_ids for r in thinking] == [r.token_ids for r in group]
    assert all(all(r.sampled) for r in plain) and any(not all(r.sampled) for r in thinking)


def test_openai_backend_with_a_fake_server(tmp_path):
    info = write_prompts(tmp_path, [{"id": "x", "image": "a.png", "answer": "a",
                                     "conversations": [{"from": "system", "value": "Be brief."},
                                                       {"from": "human", "value": "Look: <image>\nWhat?"}]}])
    proc = Processor.from_pretrained(TINY)
    builder = SampleBuilder(proc, PixelBudgets(1024, 4096), max_length=300)
    (p,) = plan_datasets(load_datainfo(info), builder, 0, plan=prompt_planner(builder, [("exact", 1.0)], True))
    messages = openai_messages(p)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    parts = messages[1]["content"]
    assert [x["type"] for x in parts] == ["text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    calls = []

    def create(**kwargs):
        calls.append(kwargs)
        message = SimpleNamespace(content="A dog.", reasoning_content="It barks.")
        return SimpleNamespace(choices=[SimpleNamespace(message=message, finish_reason="stop"),
                                        SimpleNamespace(message=SimpleNamespace(content="Cat", reasoning_content=None),
                                                        finish_reason="length")])
    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    opts = GRPOOptions(grpo_thinking=True, grpo_thinking_budget=64, rollout_backend="openai", rollout_url="http://x")
    first, second = OpenAIRollouts(opts, proc.tokenizer, client)(p, [5, 6])
    assert calls[0]["n"] == 2 and calls[0]["extra_body"] == {"chat_template_kwargs": {"enable_thinking": True},
                                                            "thinking_budget": 64}
    assert first.text == "<think>\nIt barks.\n</think>\n\nA dog." and first.thinking_tokens > 0
    assert proc.tokenizer.decode(first.token_ids) == first.text + "<|im_end|>" and all(first.sampled)
    assert second.text == "Cat" and proc.tokenizer.decode(second.token_ids) == "Cat"  # cut by length: no im_end


# ---- training -----------------------------------------------------------------------------------------------
@register_reward("test_first_word")
def first_word(prompt: str, response: str, reference: str) -> float:
    """The toy verifiable task: the answer's first word must be the reference word."""
    words = answer_text(response).split()
    return float(bool(words) and words[0].lower() == reference)


@register_reward("test_broken")
def broken(prompt: str, response: str, reference: str) -> float:
    raise KeyError("a bug in a user's reward")


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> Path:
    """The tiny fixture with its (tied) embedding scaled x10: a less uniform start, where the target word
    " cloud" is sampled a few % of the time (with the fixture's near-uniform 1/832 it would never be)."""
    out = tmp_path_factory.mktemp("peaked") / "model"
    model = Ovis.from_pretrained(TINY)
    with torch.no_grad():
        model.llm.model.embed_tokens.weight.mul_(10)
    model.save_pretrained(out, processor=Processor.from_pretrained(TINY))
    return out


def toy_task(root: Path, n: int = 8, reward: list[str] | None = ("test_first_word",)) -> Path:
    """Prompts whose answer must start with TARGET; `reward`: the per-sample reward (None: the recipe's)."""
    questions = ["Name an animal.", "Say the word.", "What is up?", "Tell me."]
    return write_prompts(root, [{"id": f"q{i}", "question": questions[i % 4], "answer": TARGET}
                                | ({"reward": list(reward)} if reward else {}) for i in range(n)])


def grpo_recipe(model: Path, out: Path, datainfo: Path, *extra: str) -> list[str]:
    return [f'init="{model}"', f'out_dir="{out}"', f'datainfo="{datainfo}"', 'phase="grpo"', "max_tokens=256",
            "lr=1e-2", "warmup_ratio=0", "progress=false", "epochs=100", "grpo_group_size=8",
            "grpo_prompts_per_step=4", "grpo_max_new_tokens=4", "grpo_epochs=2", *extra]


def test_grpo_raises_mean_reward_on_a_toy_task(tmp_path, peaked_model):
    info = toy_task(tmp_path)
    train(load_recipe(None, grpo_recipe(peaked_model, tmp_path / "run", info, "max_steps=20", "grpo_kl_coef=0.01")))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [r["reward_mean"] for r in rows]
    print("\nGRPO mean reward per step:", " ".join(f"{x:.2f}" for x in curve))
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 >= sum(curve[:5]) / 5 + 0.5
    first = rows[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert first["response_tokens"] <= 4 and first["responses"] == 32 and first["reward_errors"] == 0
    assert {"reward_std", "reward_test_first_word", "clip_fraction", "thinking_tokens", "zero_advantage_groups"} <= set(first)
    assert rows[-1]["kl"] > 0
    lines = (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 20 * 32 and {"prompt", "response", "reward", "advantage"} <= set(json.loads(lines[0]))


def test_zero_advantage_responses_are_left_out_without_changing_the_update(tmp_path, peaked_model):
    """kl = 0 leaves A = 0 responses out of the forwards; a tiny kl trains on all of them, and at the first
    step (policy == reference, so k3 = 0) must give the same update."""
    info = toy_task(tmp_path)
    weights = {}
    for name, kl in (("skip", "0.0"), ("all", "1e-3")):
        train(load_recipe(None, grpo_recipe(peaked_model, tmp_path / name, info, "max_steps=1", "grpo_epochs=1", "grpo_prompts_per_step=8",
                                            f"grpo_kl_coef={kl}", "seed=1",  # seed 1: step 1 samples the target
                                            'autocast="off"')))  # float32: bfloat16 rounds by batch composition
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        weights[name] = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        if name == "skip":
            assert 0 < row["trained_responses"] < row["responses"]  # some groups teach, some do not
        else:
            assert row["trained_responses"] == row["responses"]
    start = load_file(str(peaked_model / "model.safetensors"))
    assert any(not torch.equal(start[k], weights["skip"][k]) for k in start)
    for k, v in weights["all"].items():
        torch.testing.assert_close(weights["skip"][k], v, rtol=1e-4, atol=1e-6)


def test_loss_norms_average_over_tokens_or_over_responses():
    token_losses = [torch.tensor([3.0]), torch.tensor([1.0, 2.0, 6.0]), torch.tensor([0.0, 4.0])]
    lengths = [len(t) for t in token_losses]
    for norm, expected in (("token", 16 / 6), ("sequence", (3 + 3 + 2) / 3)):
        scales = response_scales(lengths, norm)
        weighted = sum(float((t * w).sum()) for t, w in zip(token_losses, scales))
        assert weighted / sum(n * w for n, w in zip(lengths, scales)) == pytest.approx(expected)
    assert response_scales([0, 2], "sequence") == [0.0, 0.5]  # a response with no trained token weighs nothing
    with pytest.raises(ValueError, match="grpo_loss_norm"):
        GRPOOptions(grpo_loss_norm="response").validate()


def test_sequence_loss_norm_trains_like_token_norm_on_one_token_responses(tmp_path, peaked_model):
    """With one-token responses the two means are one: the same update, and on policy (ratio 1) the same loss,
    minus the mean advantage, 0."""
    info = toy_task(tmp_path)
    weights = {}
    for norm in ("token", "sequence"):
        run = tmp_path / norm
        train(load_recipe(None, grpo_recipe(peaked_model, run, info, "max_steps=1", "grpo_epochs=1",
                                            "grpo_max_new_tokens=1", f'grpo_loss_norm="{norm}"',
                                            "grpo_prompts_per_step=8", "seed=1", 'autocast="off"')))
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert row["trained_responses"] > 0 and row["loss"] == pytest.approx(0.0, abs=1e-6)
        weights[norm] = load_file(str(run / "final" / "model.safetensors"))
    start = load_file(str(peaked_model / "model.safetensors"))
    assert any(not torch.equal(start[k], weights["sequence"][k]) for k in start)
    for k, v in weights["token"].items():
        torch.testing.assert_close(weights["sequence"][k], v, rtol=1e-5, atol=1e-7)


def test_reference_answers_longer_than_the_rollouts_are_reported(tmp_path, peaked_model, caplog):
    info = toy_task(tmp_path, n=4)
    with caplog.at_level("WARNING", logger="ovis25.train"):
        train(load_recipe(None, grpo_recipe(peaked_model, tmp_path / "run", info, "max_steps=1",
                                            "grpo_max_new_tokens=1")))
    assert "4 of 4 prompts have reference answers longer than grpo_max_new_tokens = 1" in caplog.text
    assert "raise grpo_max_new_tokens" in caplog.text


def test_grpo_resume_gives_same_final_weights_and_counts_reward_errors(tmp_path, peaked_model):
    info = toy_task(tmp_path, reward=["test_first_word", "test_broken:0.5"])
    common = ["max_steps=3", "save_every=1", "keep_last=3", "grpo_group_size=4", "grpo_prompts_per_step=2"]
    full = tmp_path / "full"
    train(load_recipe(None, grpo_recipe(peaked_model, full, info, *common)))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000001", resumed / "checkpoints" / "step-00000001")
    train(load_recipe(None, grpo_recipe(peaked_model, resumed, info, *common)))
    a, b = load_file(str(full / "final/model.safetensors")), load_file(str(resumed / "final/model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rewards = [[json.loads(line)["reward_mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (full, resumed)]
    assert rewards[0][1:] == rewards[1]  # the resumed run sampled the same responses
    # the raising reward scored 0 for each of the 8 responses per step, counted across the resume
    assert [json.loads(line)["reward_errors"] for line in (resumed / "metrics.jsonl").read_text().splitlines()] == [8, 8]
    for run in (full, resumed):
        assert json.loads((run / "summary.json").read_text())["skipped"] == {"reward_error:test_broken": 24}


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not available")
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_torchrun_smoke_with_thinking_budget_and_kl(tmp_path, peaked_model, parallel):
    """2 ranks: FSDP rolls out on a gathered plain copy, DDP on the policy module itself. Text-only prompts
    leave the visual tokenizer without gradients, which DDP (no unused-parameter detection) rejects: train the
    LLM only there."""
    info = toy_task(tmp_path, reward=None)  # the test's own reward is not registered in the subprocesses
    out = tmp_path / parallel
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    port = 29500 + os.getpid() % 1000 + (13 if parallel == "fsdp" else 17)
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port), "-m", "ovis25.train", "-",
           *grpo_recipe(peaked_model, out, info, "max_steps=2", f'parallel="{parallel}"', "grpo_group_size=4",
                        'rewards=["exact:1.0", "format:0.1"]', "grpo_thinking=true", "grpo_thinking_budget=3",
                        "grpo_max_new_tokens=8", "grpo_kl_coef=0.05", "save_every=1",
                        *(['train_modules="llm"'] if parallel == "ddp" else []))]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["responses"] == 16 for row in rows)
    assert all(math.isfinite(row["loss"]) and row["thinking_tokens"] > 0 for row in rows)
    assert (out / "final" / "model.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
