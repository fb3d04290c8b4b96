"""The fast CI variant of `make demo`: every phase of the tiny curriculum runs on the `ci` world."""
import json
import random
import re
import shlex
import shutil
import sys
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch.nn.utils import parametrize
from conftest import REPO

from ovis25 import Ovis, Processor
from ovis25.chat import Chat
from ovis25.cli import main as cli_main
from ovis25.demo import TRAIN_PHASES, StaleRunError, phases, run_demo, try_it
from ovis25.grounding import format_box
from ovis25.synth.build import CAPTIONED
from ovis25.synth.regions import CLASS, CLASSES
from ovis25.synth.world import SHAPES

sys.path.insert(0, str(REPO / "benchmarks"))
import attribute_lookup  # noqa: E402  (benchmarks/attribute_lookup.py)
import chart_sums  # noqa: E402  (benchmarks/chart_sums.py)
import context_reading  # noqa: E402  (benchmarks/context_reading.py)
import demo_curves  # noqa: E402  (benchmarks/demo_curves.py)
import grounding_lookup  # noqa: E402  (benchmarks/grounding_lookup.py)
import grounding_selection  # noqa: E402  (benchmarks/grounding_selection.py)
import recall  # noqa: E402  (benchmarks/recall.py)
import targets  # noqa: E402  (benchmarks/targets.py)
import text_lookup  # noqa: E402  (benchmarks/text_lookup.py)
import token_oracle  # noqa: E402  (benchmarks/token_oracle.py)
import weight_merge  # noqa: E402  (benchmarks/weight_merge.py)


def test_a_resumed_demo_refuses_phases_trained_from_other_settings(tmp_path):
    overrides = {"max_steps": 2, "max_tokens": 256, "progress": False}
    p5 = {"grpo_prompts_per_step": 2, "grpo_group_size": 2, "grpo_max_new_tokens": 4}
    args = dict(overrides=overrides, eval_limit=1, runs_dir=tmp_path)
    run = run_demo("ci", "ci", phase_overrides={"p5": p5}, **args)
    every = phases("ci")
    kept = {p: (run / p / "final" / "model.safetensors").stat().st_mtime_ns for p in every}
    changed = {"p4": {"lr": 1e-5}, "p5": p5}  # P4's settings differ: P4 and P5 no longer follow from them
    with pytest.raises(StaleRunError, match=r"p4, p5 trained from another recipe.*--retrain"):
        run_demo("ci", "ci", phase_overrides=changed, **args)
    with pytest.raises(StaleRunError, match="seed 0"):
        run_demo("ci", "ci", seed=1, phase_overrides={"p5": p5}, **args)
    assert {p: (run / p / "final" / "model.safetensors").stat().st_mtime_ns for p in every} == kept
    run_demo("ci", "ci", phase_overrides=changed, retrain=True, **args)
    now = {p: (run / p / "final" / "model.safetensors").stat().st_mtime_ns for p in every}
    assert [p for p in every if now[p] != kept[p]] == ["p4", "p5"]
    run_demo("ci", "ci", phase_overrides=changed, **args)  # now in step: resumes without training
    assert {p: (run / p / "final" / "model.safetensors").stat().st_mtime_ns for p in every} == now
    shutil.rmtree(run / "p5" / "final")  # as if P5 had been interrupted: its checkpoints would resume
    with pytest.raises(StaleRunError, match=r"p5 trained from another recipe or settings than now: pass"):
        run_demo("ci", "ci", phase_overrides={"p4": {"lr": 1e-5}}, **args)
    results = (run / "eval.json").read_text()
    with pytest.raises(ValueError, match="eval_limit must be at least 1"):  # before it could empty eval.json
        run_demo("ci", "ci", **{**args, "eval_limit": 0})
    assert (run / "eval.json").read_text() == results


def test_demo_pipeline_wiring(tmp_path, monkeypatch):
    overrides = {"max_steps": 6, "max_tokens": 256, "epochs": 4, "progress": False}
    args = dict(overrides=overrides, eval_limit=2,
                runs_dir=tmp_path, phase_overrides={"p5": {"grpo_prompts_per_step": 4, "grpo_group_size": 2,
                                                           "grpo_max_new_tokens": 8}})
    run = run_demo("ci", "ci", **args)
    every = phases("ci")  # with the look-up phases before P2, as the long preset's
    assert every == (*TRAIN_PHASES[:3], "p2a", "p2b", "p2c", *TRAIN_PHASES[3:])
    timings = json.loads((run / "timings.json").read_text())
    assert list(timings) == ["world", *every, "evaluation", "total"]
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"))
    run_demo("ci", "ci", **args)  # a resumed run redoes only the evaluation and keeps the other times
    again = json.loads((run / "timings.json").read_text())
    assert {k: again[k] for k in ["world", *every]} == {k: timings[k] for k in ["world", *every]}
    assert f"| p2 | {timings['p2']:.0f} |" in (run / "report.md").read_text()
    for phase in every:
        final = run / phase / "final"
        assert (final / "config.json").exists() and (final / "model.safetensors").exists(), phase
        rows = [json.loads(line) for line in (run / phase / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(r["loss"] == r["loss"] for r in rows), phase  # finite, one row per step
    # the language pretraining phase learns something even in six steps
    p0 = [json.loads(line)["loss"] for line in (run / "p0" / "metrics.jsonl").read_text().splitlines()]
    assert p0[-1] < p0[0]
    Ovis.from_pretrained(run / "final")
    Processor.from_pretrained(run / "final")
    results = json.loads((run / "eval.json").read_text())
    assert {"p1", "p2", "p3", "p3+think", "p4", "p5", "p5+think"} <= set(results)
    # each look-up phase trains on its task of the look-up world, scored on that world's test questions apart
    # from eval.json; the look-up world's spatial test questions are the demo world's (the same seed and stream)
    from ovis25.demo import LOOKUP_PHASES
    for phase, (task, _) in LOOKUP_PHASES["ci"].items():
        config = json.loads((run / phase / "config.json").read_text())
        assert config["datasets"] == [f"synth_qa_{task}"]
        assert config["datainfo"] == str(run / "lookup" / "datainfo.json")
    lookup = json.loads((run / "lookup.json").read_text())
    assert list(lookup) == ["p2a", "p2b", "p2c"] and not {"p2a", "p2b", "p2c"} & set(results)
    assert all(set(v) == {"grid_place", "grid_spatial", "spatial"} and all(s["n"] == 2 for s in v.values())
               for v in lookup.values())
    test = {name: [json.loads(line) for line in (run / name / "test.jsonl").read_text().splitlines()]
            for name in ("world", "lookup")}
    assert [r["question"] for r in test["lookup"] if r["task"] == "spatial"] == \
        [r["question"] for r in test["world"] if r["task"] == "spatial"]
    preference = json.loads((run / "preference.json").read_text())
    assert set(preference) == {"p3", "p4"} and all(0 <= v["accuracy"] <= 1 and len(v["wins"]) == len(v["kinds"])
                                                   == v["n"] for v in preference.values())
    rewards = json.loads((run / "reward.json").read_text())
    assert set(rewards) == {"p4", "p5"} and set(rewards["p5"]) == set(results["p5"])
    # the greedy tables use eval_limit items per task, the sampled reward every test item
    assert all(0 <= s["reward"] <= 1 and s["n"] == 4 * len(s["item_rewards"]) >= 4 * results["p5"][t]["n"]
               for t, s in rewards["p5"].items())
    for phase, tasks in results.items():
        assert tasks, phase
        for task, s in tasks.items():
            assert 0 <= s["accuracy"] <= 1 and s["n"] > 0 and s["thinking"] == phase.endswith("+think"), (phase, task)
    # the targets benchmark scores the final checkpoint on a larger held-out split, the world's own items first
    monkeypatch.setattr(targets, "RESULTS", tmp_path)
    targets.main(["--world", str(run / "world"), "--per-task", "5", "--models", f"final={run / 'final'}",
                  "--out", "targets"])
    scored = json.loads((tmp_path / "targets.json").read_text())["results"]["final"]
    assert (run / "heldout5" / "heldout.json").exists()
    for name, (task, prefix, threshold) in targets.TARGETS.items():
        s = scored[name]
        assert 0 <= s["accuracy"] <= 1 and 0 < s["n"] <= 5 and s["world_test_n"] <= 3, name  # the ci world holds 3
        assert s["met"] == (s["accuracy"] >= threshold), name
        assert ("mean_iou" in s) == (task == "grounding"), name
    assert scored["grounding"]["accuracy"] <= 2 * scored["grounding"]["mean_iou"]  # each hit adds at least 0.5
    # the grounding look-up benchmark trains P2c's recipe on grounding from a checkpoint and scores each box by the
    # object it fits: the test scenes drawn again hold the named object first, the world's answer
    monkeypatch.setattr(grounding_lookup, "RESULTS", tmp_path)
    grounding_lookup.main(["--models", f"p1={run / 'p1' / 'final'}", "--questions", "8", "--test", "4",
                           "--work", str(tmp_path / "grounding_lookup")])
    scored = json.loads((tmp_path / "grounding_lookup.json").read_text())["results"]["p1"]
    assert json.loads((tmp_path / "grounding_lookup" / "p1" / "config.json").read_text())["datasets"] == \
        ["synth_qa_grounding"]
    assert scored["named"] == scored["hit"] <= 2 * scored["mean_iou"] and 0 <= scored["another"] <= 1
    answers = [json.loads(line)["answer"] for line in (tmp_path / "grounding_lookup" / "world" / "test.jsonl")
               .read_text().splitlines()]
    objects = grounding_lookup.held_out_objects(0, 4, answers)
    assert [format_box(boxes[0]) for boxes in objects] == answers and all(len(b) >= 2 for b in objects)
    assert grounding_lookup.fits([{"response": a} for a in answers], objects) == {"named": 1.0, "another": 0.0}
    others = [{"response": format_box(boxes[1])} for boxes in objects]
    assert grounding_lookup.fits(others, objects) == {"named": 0.0, "another": 1.0}
    with pytest.raises(RuntimeError, match="test item 0"):
        grounding_lookup.held_out_objects(0, 1, ["<box>(0.000,0.000),(0.500,0.500)</box>"])
    # the chart-sums benchmark: text sums, half of them a chart's caption, each answer the sum of the values named;
    # charts alone and with the sums mixed in, each scored by kind of chart question and on text sums
    for question, answer in chart_sums.text_sums(0, "train", 20):
        *caption, ask = question.split("\n")
        values = dict(pair.split(" is ") for pair in caption[0].split(": ")[1].split(", ")) if caption else {}
        p, q = re.fullmatch(r"What is (\w) plus (\w)\?", ask).groups()
        assert int(answer) == sum(int(values.get(k, k)) for k in (p, q)), question
    monkeypatch.setattr(chart_sums, "RESULTS", tmp_path)
    chart_sums.main(["--init", str(run / "p1" / "final"), "--questions", "6", "--sums", "6", "--test", "3",
                     "--work", str(tmp_path / "chart_sums")])
    scored = json.loads((tmp_path / "chart_sums.json").read_text())["results"]
    assert list(scored) == ["before", "charts", "charts + sums"]
    assert all(0 <= v["text sums"] <= 1 and 0 <= v["chart"] <= 1 for v in scored.values())
    assert json.loads((tmp_path / "chart_sums" / "charts_sums" / "config.json").read_text())["datasets"] == \
        ["synth_qa_chart", "synth_text_sums"]
    # the context-reading probe runs on P0's LLM: every captioned task, its kinds adding up to the task
    items, kinds = context_reading.questions(3, seed=0)
    assert all(len(it.conversations[0]["value"].split("\n")) == 2 and not it.images for it in items)  # caption, question
    probe = context_reading.score(run / "p0" / "final", items, kinds)
    for mode in ("thinking off", "thinking on"):
        for task in CAPTIONED:
            parts = [k for k in probe[mode] if k.startswith(task + ": ")]
            assert probe["n"][task] == 3 and sum(probe["n"][k] for k in parts) in ((3,) if parts else (0,))
            if parts:
                assert sum(probe[mode][k] * probe["n"][k] for k in parts) / 3 == pytest.approx(probe[mode][task],
                                                                                              abs=2e-3)
    # the text look-up benchmark: each answer is what the caption says of the named object (checked on the
    # caption's words), no object is named twice, and a short run from P0 trains and is probed by kind
    rng = random.Random(1)
    for _ in range(20):
        caption, turns = text_lookup.conversation(rng)
        listed = caption.split(": ", 1)[1].split(", ")  # "a red circle at the top left", ...
        assert len(turns) == len(listed) and len({q for q, _, _ in turns}) == len(turns)
        for question, answer, kind in turns:
            named = re.fullmatch(r"What color is the (\w+)\?|What shape is the (\w+) object\?|"
                                 r"Which part of the image is the (\w+ \w+) in\?", question).groups()
            match = [o for o in listed if (named[0] or named[1] or named[2]) in o.split(" at ")[0].split(" ", 1)[1]]
            assert len(match) == 1, question
            name, place = match[0].removeprefix("a ").split(" at the ")
            assert answer == {"color": name.split()[0], "shape": name.split()[1], "place": place}[kind]
    datainfo = text_lookup.write_dataset(tmp_path / "lookup", 6)
    losses = text_lookup.train_chunk(run / "p0" / "final", tmp_path / "lookup_run", datainfo, 1, 3e-3,
                                     ["max_steps=2", "max_tokens=256", "progress=false"])
    items, kinds = text_lookup.probe_items(6)
    probe = text_lookup.score(tmp_path / "lookup_run" / "final", items, kinds)
    assert len(losses) == 2 and set(probe) == set(kinds) and all(0 <= v <= 1 for v in probe.values())
    start = text_lookup.starting_point(run / "p0" / "final", tmp_path / "start", 3.0, 1e4)
    assert json.loads((start / "config.json").read_text())["llm_config"]["rope_theta"] == 1e4
    q_norm = [Ovis.from_pretrained(d).llm.model.layers[0].self_attn.q_norm.weight for d in (start, run / "p0" / "final")]
    torch.testing.assert_close(q_norm[0], 3 * q_norm[1])
    # P4 exports the midpoint between P3 and its trained weights: the weight-merge benchmark trains P4 again,
    # unmerged, and its half-way mix is the demo's P4
    start, trained = weight_merge.retrain(run, "p4", tmp_path / "p4_unmerged", 0,
                                          [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    assert start == run / "p3" / "final"
    demo_p4 = dict(Ovis.from_pretrained(run / "p4" / "final").named_parameters())
    unmerged = dict(Ovis.from_pretrained(trained).named_parameters())
    assert any(not torch.equal(unmerged[n], p) for n, p in demo_p4.items())
    mix = weight_merge.mixed(dict(Ovis.from_pretrained(start).named_parameters()), trained, 0.5)
    for name, p in mix.model.named_parameters():
        torch.testing.assert_close(p, demo_p4[name], rtol=1e-6, atol=1e-7, msg=name)
    # the token oracle's perfect tokens state the count: one centre token per counted object (two centres in
    # one 32-pixel cell share a token; 0.3% of count images), and a short run of each kind of tokens trains
    oracle, count = token_oracle.Oracle(run / "p1" / "final", "oracle"), token_oracle.Count(echo=False)
    for item in count.test_items(random.Random(0), 5):
        _, _, pixels, grid = oracle.processor.format_conversation(
            [{"from": "human", "value": f"<image>\n{item.question}"}], images=[item.image], **token_oracle.PIXELS)
        classes = oracle.perfect_form(item, pixels, grid)[:, :len(CLASSES)].argmax(-1).tolist()
        shape = next(s for s in SHAPES if item.question == f"How many {s}s are there?")
        counted = [o for o in item.objs if o.shape == shape]  # distractors differ in shape and colour
        assert len(counted) == int(item.answer) and len({o.color for o in counted}) == 1
        (width, height), (_, rows, cols) = item.image.size, grid[0].tolist()
        cells = {(int(o.center[1] * rows / 2 / height), int(o.center[0] * cols / 2 / width)) for o in counted}
        assert classes.count(CLASS[f"{counted[0].color} {shape} centre"]) == len(cells)
    # the swap test asks every object of a multi-object attribute scene, each question about one object
    groups = attribute_lookup.swapped_questions(run / "world", 0)
    assert groups and all(len({q for q, _ in g["pairs"]}) == len(g["pairs"]) > 1 for g in groups)
    scores = attribute_lookup.score(Chat.from_pretrained(run / "p2" / "final"), groups[:2])
    assert sum(s["scenes"] for s in scores.values()) == 2 and all(s["right"] <= s["questions"] for s in scores.values())
    for variant in ("real", "oracle", "argmax"):
        result = token_oracle.train_variant(run / "p1" / "final", "count", variant, steps=2, batch=2, test_n=3,
                                            evals=1, seed=0)
        assert 0 <= result["accuracy"] <= 1 and result["by_count"] and len(result["curve"]) == 2
    # the attribute task asks about every object of a scene; right answers score 1, one answer for all scores
    # the scenes as "one answer"; the scales sharpen the LLM's attention and the visual tokens
    attribute = token_oracle.Attribute(echo=False)
    items = attribute.test_items(random.Random(0), 4)
    for item in items:
        obj = item.objs[item.target]
        assert item.answer == (obj.color if item.question == f"What color is the {obj.shape}?" else obj.shape)
    right = attribute.score(items, [item.answer for item in items])
    assert right["color_accuracy"] == right["shape_accuracy"] == 1 and right["color_same_answer"] == 0
    assert attribute.score(items, ["red"] * len(items))["color_same_answer"] == 1
    plain, scaled = (token_oracle.Oracle(run / "p1" / "final", "real", *scales) for scales in ((), (2.0, 3.0)))
    torch.testing.assert_close(scaled.model.llm.model.layers[0].self_attn.q_norm.weight,
                               2 * plain.model.llm.model.layers[0].self_attn.q_norm.weight)
    torch.testing.assert_close(scaled.model.visual_tokenizer.head[1].bias, 3 * plain.model.visual_tokenizer.head[1].bias)
    result = token_oracle.train_variant(run / "p1" / "final", "attribute", "real", steps=2, batch=2, test_n=2,
                                        evals=1, seed=0, qk_scale=2.0, head_scale=2.0)
    assert 0 <= result["color_accuracy"] <= 1 and len(result["curve"]) == 2
    # the command the demo ends with runs as printed, at the trained budget
    command = shlex.split(try_it(run).removeprefix("Try it:").split("   (answer")[0])
    assert command[:2] == ["ovis25", "chat"] and "--max-pixels" in command
    assert cli_main(command[1:] + ["--max-new-tokens", "4", "--no-stream"]) == 0
    report = (run / "report.md").read_text()
    assert "The look-ups (before P2)" in report and "| grid_place |" in report
    assert "Accuracy per task" in report and "constant answer |" in report and "Vision pretraining (P0v)" in report and "Held-out reward of sampled" in report and "| mean |" in report and (run / "accuracy.png").exists() and (run / "loss.png").exists()
    # each count question's category is the answer it needs: the per-category rows cover the per-task ones
    eval_p2 = json.loads((run / "eval.json").read_text())["p2"]["count"]
    assert sum(c["n"] for c in eval_p2["categories"].values()) == eval_p2["n"]
    assert "Accuracy by category" in report and re.search(r"\| count \| [1-5] to count \|", report)


def test_recall_benchmark_sequences_and_training():
    """benchmarks/recall.py: each target is the value paired with the repeated key earlier in the sequence, every
    key is asked once, and a short run of a changed LLM shape trains (loss falls) and is scored; the QK-norm gains
    take their own LR multiplier, and the no-QK-norm ablation trains."""
    ids, targets = recall.sequences(50, random.Random(0), 4)
    assert ids.shape == targets.shape == (50, 17)
    for seq, target in zip(ids.tolist(), targets.tolist()):
        pairs = dict(zip(seq[0:8:2], seq[1:8:2]))
        assert len(pairs) == 4 and seq[8] == recall.SEPARATOR and all(k in recall.KEYS for k in pairs)
        asked = seq[9::2]
        assert sorted(asked) == sorted(pairs) and seq[10::2] == [pairs[k] for k in asked]
        assert target[9::2] == [pairs[k] for k in asked] and set(target[:9] + target[10::2]) == {-100}
    ids, targets = recall.sequences(5, random.Random(0), 4, queries=1)  # one key asked: no elimination to use
    assert ids.shape == (5, 11) and [seq[10] for seq in ids.tolist()] == [dict(zip(seq[0:8:2], seq[1:8:2]))[seq[9]]
                                                                        for seq in ids.tolist()]
    assert (targets != -100).sum(1).tolist() == [1] * 5
    # value first, and three fillers between each query and the answer, which is due at the last filler
    ids, targets = recall.sequences(20, random.Random(0), 3, gap=3, value_first=True)
    assert ids.shape == targets.shape == (20, 7 + 3 * 5)
    for seq, target in zip(ids.tolist(), targets.tolist()):
        pairs = dict(zip(seq[1:6:2], seq[0:6:2]))  # key -> value, the value written first
        assert all(k in recall.KEYS and v in recall.VALUES for k, v in pairs.items())
        for query in range(3):
            key, *fillers, value = seq[7 + 5 * query: 12 + 5 * query]
            assert fillers == list(recall.FILLERS[:3]) and value == pairs[key]
            due = target[7 + 5 * query: 12 + 5 * query]
            assert due == [-100, -100, -100, value, -100]
    ids, targets = recall.sequences(10, random.Random(0), 3, gap=2, joint=True)  # one position per pair
    assert ids.shape == (10, 4 + 3 * 4, 2) and targets.shape == (10, 16)
    for seq, target in zip(ids.tolist(), targets.tolist()):
        pairs = dict(seq[:3])
        assert all(k in recall.KEYS and v in recall.VALUES for k, v in pairs.items())
        assert all(a == b for a, b in seq[3:]) and [i for i, t in enumerate(target) if t != -100] == [6, 10, 14]
        assert [pairs[k] for k, _ in seq[4::4]] == target[6::4]
    ids, targets = recall.sequences(10, random.Random(0), 3, gap=2, conjunction=True)  # two-token keys
    assert ids.shape == targets.shape + (3,) == (10, 4 + 3 * 5, 3)
    for seq, target in zip(ids.tolist(), targets.tolist()):
        pairs = {(c, s): v for c, s, v in seq[:3]}
        assert all(c in recall.COLOUR_KEYS and s in recall.SHAPE_KEYS for c, s in pairs)
        assert len(pairs) == 3 and all(any(sum(a == b for a, b in zip(key, other)) == 1 for other in pairs)
                                       for key in pairs)  # each key shares its colour or shape with another
        blocks = [[t for t, _, _ in seq[4 + 5 * q: 9 + 5 * q]] for q in range(3)]
        assert [pairs[tuple(b[:2])] for b in blocks] == [b[4] for b in blocks] == target[7::5]
    plain, _ = recall.sequences(1, random.Random(1), 3, gap=2, conjunction=True)
    ids, targets = recall.sequences(4, random.Random(1), 3, gap=2, conjunction=True, background=5)
    assert ids.shape == (4, 4 + 5 + 3 * 5, 3)
    for seq, target in zip(ids.tolist(), targets.tolist()):  # the pairs among five background positions
        background = [p for p in seq[:8] if p[0] == recall.BACKGROUND]
        assert len(background) == 5 and all(p[1] == recall.BACKGROUND and p[2] in recall.VALUES for p in background)
        pairs = {(c, s): v for c, s, v in seq[:8] if c != recall.BACKGROUND}
        assert [pairs[tuple(t for t, _, _ in seq[9 + 5 * q: 11 + 5 * q])] for q in range(3)] == target[12::5]
    assert sorted(p for p in ids[0, :8].tolist() if p[0] != recall.BACKGROUND) == sorted(plain[0, :3].tolist())
    model = recall.model_for({"hidden_size": 64, "num_hidden_layers": 1}, 0)
    embeds = model.model.embed_tokens.weight
    with torch.no_grad():  # a joint position is the mean of its two embeddings; a doubled token is itself
        mean = model.lm_head(model((embeds[11] + embeds[111])[None, None] / 2, torch.zeros(1, 1, dtype=torch.long)))
        assert torch.allclose(recall.logits_of(model, torch.tensor([[[11, 111]]])), mean, atol=1e-6)
        assert torch.allclose(recall.logits_of(model, torch.tensor([[[11, 11]]])),
                              recall.logits_of(model, torch.tensor([[11]])), atol=1e-6)
    gapped = partial(recall.sequences, pairs=3, gap=3)
    mixed, rng = recall.mixture(gapped, partial(gapped, gap=0), 0.5), random.Random(0)
    assert {mixed(2, rng)[0].shape[1] for _ in range(20)} == {7 + 3 * 2, 7 + 3 * 5}  # whole batches of each
    model = recall.model_for(recall.parse_set(["hidden_size=64", "num_hidden_layers=2", "rope_theta=1e4"]), 0)
    assert model.config.intermediate_size == 256 and model.config.rope_theta == 1e4
    curve = recall.train(model, partial(recall.sequences, pairs=2), 40, 16, 3e-3, 20, 0)
    assert [row["steps"] for row in curve] == [20, 40] and curve[1]["loss"] < curve[0]["loss"]
    assert all(row["accuracy"] == pytest.approx(sum(row["by_query"]) / 2, abs=1e-3) for row in curve)
    with pytest.raises(SystemExit, match="hidden_sise"):
        recall.parse_set(["hidden_sise=64"])

    def gain_change(mult: float) -> float:  # how far 4 steps move the QK-norm gains
        model = recall.model_for({"hidden_size": 64, "num_hidden_layers": 1}, 0)
        recall.train(model, partial(recall.sequences, pairs=2), 4, 8, 1e-3, 4, 0, qk_norm_lr_mult=mult)
        gains = [p for n, p in model.named_parameters() if recall.is_qk_norm(n)]
        return max((p - 1).abs().max().item() for p in gains)

    assert gain_change(100.0) > 10 * gain_change(1.0) > 0
    model = recall.model_for({"hidden_size": 64, "num_hidden_layers": 1}, 0)
    recall.drop_qk_norm(model)
    assert not any(recall.is_qk_norm(n) for n, _ in model.named_parameters())
    assert recall.train(model, partial(recall.sequences, pairs=2), 2, 8, 1e-3, 2, 0)[0]["loss"] > 0
    gapped = partial(recall.sequences, pairs=2, gap=8)  # trained half without the gap, scored with it
    curve = recall.train(model, recall.mixture(gapped, partial(gapped, gap=0), 0.5), 2, 8, 1e-3, 2, 0,
                         held_out=gapped)
    assert len(curve[0]["by_query"]) == 2
    model = recall.model_for({"hidden_size": 64, "num_hidden_layers": 1}, 0)
    curve = recall.train(model, partial(recall.sequences, pairs=2), 4, 8, 1e-3, 1, 0,
                         qk_norm_phase_in=(0.25, 0.75))  # complete at step 3
    assert [row["qk_norm_blend"] for row in curve] == [0.0, 0.0, 0.5, 1.0]
    assert not model.model.layers[0].self_attn.k_norm._forward_hooks  # handed back as plain Qwen3


def test_demo_curves_draw_spatial_questions_on_one_token_grids(tmp_path):
    """demo_curves.py --grids: while the world is built, spatial scenes are 64 x 64 grids with each object alone in
    one quadrant, and each answer holds for the objects' centres; the scenes are the demo's again afterwards, and
    tasks a grid cannot hold are refused."""
    from ovis25.synth import world

    rng = random.Random(3)
    with demo_curves.on_grids():
        samples = [world.spatial(rng) for _ in range(30)]
    for sample in samples:
        a, b = (world.Obj.from_dict(sample.meta[k]) for k in "ab")
        axis, sign = world.RELATIONS[sample.meta["relation"]]
        assert sample.images[0].size == (64, 64)
        assert all(o.box[2] - o.box[0] < 32 and o.box[0] // 32 == o.box[2] // 32 for o in (a, b))  # one token each
        assert sample.answer == ("yes" if (a.center[axis] - b.center[axis]) * sign > 0 else "no")
    assert {s.answer for s in samples} == {"yes", "no"}
    assert world.spatial(rng).images[0].size != (64, 64)
    with pytest.raises(SystemExit, match="--grids: only spatial, grounding .*count"):
        demo_curves.main(["--grids", "--tasks", "spatial,count", "--init", str(tmp_path)])


def test_recall_visual_pairs_hold_tokens_of_their_own():
    """recall.py --visual: the pairs hold a class token for the key and a place token for the value (each or both),
    the queries and answers the text tokens; --visual-from-text makes a class embedding the mean of its colour's
    and shape's and a place its value's, once ("start") or tied throughout with a learned difference."""
    text, _ = recall.sequences(6, random.Random(2), 3, gap=2, conjunction=True)
    for visual in ("keys", "values", "both"):
        ids, targets = recall.sequences(6, random.Random(2), 3, gap=2, conjunction=True, visual=visual)
        assert ids.shape == text.shape and torch.equal(ids[:, 3:], text[:, 3:])  # queries and answers unchanged
        for seq, plain in zip(ids.tolist(), text.tolist()):
            for (a, b, v), (c, s, value) in zip(seq[:3], plain[:3]):
                assert (a, b) == ((recall.class_of((c, s)),) * 2 if visual != "values" else (c, s))
                assert v == (recall.PLACES[value - recall.VALUES.start] if visual != "keys" else value)
    assert len({recall.class_of((c, s)) for c in recall.COLOUR_KEYS for s in recall.SHAPE_KEYS}) == 100
    model = recall.model_for({"hidden_size": 64, "num_hidden_layers": 1}, 0, recall.VISUAL_VOCAB)
    weights = model.model.embed_tokens.weight
    recall.start_visual_from_text(weights)
    pair = torch.tensor([[recall.class_of((12, 25))] * 2 + [recall.PLACES[7]]])
    assert torch.allclose(weights[pair].mean(1), weights[torch.tensor([[12, 25, recall.VALUES[7]]])].mean(1))
    model = recall.model_for({"hidden_size": 64, "num_hidden_layers": 1}, 0, recall.VISUAL_VOCAB)
    before = model.model.embed_tokens.weight.detach().clone()
    parametrize.register_parametrization(model.model.embed_tokens, "weight", recall.VisualFromText())
    tied = model.model.embed_tokens.weight
    assert torch.equal(tied[:recall.PLACES.start], before[:recall.PLACES.start])
    assert torch.allclose(tied[recall.PLACES.start + 3], before[recall.VALUES.start + 3])
    assert torch.allclose(tied[recall.class_of((10, 29))], (before[10] + before[29]) / 2)
    curve = recall.train(model, partial(recall.sequences, pairs=3, conjunction=True, visual="both"), 2, 8, 1e-3, 2, 0)
    assert curve[0]["loss"] > 0 and model.model.embed_tokens.parametrizations.weight.original.grad is not None


def test_recall_benchmark_trains_a_checkpoints_llm_and_saves_it(tmp_path, monkeypatch):
    """recall.py --init DIR --save OUT: trains the checkpoint's own LLM and writes a loadable checkpoint in which
    only the LLM changed; --save alone is refused."""
    from conftest import model_dir

    monkeypatch.setattr(recall, "RESULTS", tmp_path / "results")
    out = tmp_path / "after_recall"
    monkeypatch.setattr(sys, "argv", ["recall.py", "--init", str(model_dir()), "--save", str(out), "--steps", "4",
                                      "--every", "2", "--batch", "4", "--lr", "1e-2", "--out", "r"])
    recall.main()
    assert [row["steps"] for row in json.loads((tmp_path / "results" / "r.json").read_text())["curve"]] == [2, 4]
    before, after = Ovis.from_pretrained(model_dir()).state_dict(), Ovis.from_pretrained(out).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("llm.") for name in changed)
    tokenizers = [Processor.from_pretrained(d).tokenizer for d in (model_dir(), out)]
    assert tokenizers[0].encode("a square") == tokenizers[1].encode("a square")
    monkeypatch.setattr(sys, "argv", ["recall.py", "--save", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--save needs --init"):
        recall.main()


def test_grid_scenes_put_each_object_alone_in_one_visual_token():
    """grounding_selection.py's grid variant: 64 x 64 images (2 x 2 visual tokens at the demo's budget), each
    object drawn inside its own 32 x 32 quadrant, and the answer the named object's box."""
    import numpy as np

    from ovis25.grounding import parse_boxes
    from ovis25.synth.world import COLORS

    draw, rng, grids = grounding_selection.grounding_with("grid"), random.Random(0), 0
    for _ in range(60):
        sample = draw(rng)
        image = sample.images[0]
        if image.size != (64, 64):
            continue
        grids += 1
        pixels = np.asarray(image)
        target = sample.question.split("<ref>")[1].split("</ref>")[0]
        assert len(sample.meta["objects"]) in (2, 3, 4) and sample.meta["target"]["color"] in target
        box = parse_boxes(sample.answer)[0]
        quadrant = (int(box.x1 * 64) // 32, int(box.y1 * 64) // 32)
        assert quadrant == (min(int(box.x2 * 64), 63) // 32, min(int(box.y2 * 64), 63) // 32)  # inside one token
        x0, y0 = quadrant[0] * 32, quadrant[1] * 32
        cell = pixels[y0:y0 + 32, x0:x0 + 32].reshape(-1, 3)
        colour = np.array(COLORS[target.split()[0]])
        assert (np.abs(cell.astype(int) - colour).sum(1) < 30).mean() > 0.15  # the named colour fills the token
    assert 15 < grids < 45  # about half the images


@pytest.mark.parametrize("variant", ["gridplace", "placemix", "place"])
def test_place_questions_answer_the_named_objects_place(variant):
    """grounding_selection.py's place variants: the answer is the named object's place, read here from the pixels
    (the third of the image holding the centre of its colour's extent, where no other object shares the colour),
    and the share of one-token grids is the variant's."""
    import numpy as np

    from ovis25.synth.world import COLORS

    draw, rng, grids, checked = grounding_selection.grounding_with(variant), random.Random(1), 0, 0
    for _ in range(40):
        sample = draw(rng)
        image = sample.images[0]
        grids += image.size == (64, 64)
        name = sample.question.removeprefix("Which part of the image is the ").removesuffix(" in?")
        colour = name.split()[0]
        assert sample.meta["target"]["color"] == colour and sample.metric == "exact"
        if [o["color"] for o in sample.meta["objects"]].count(colour) > 1:
            continue
        ys, xs = np.nonzero(np.abs(np.asarray(image).astype(int) - COLORS[colour]).sum(2) < 30)
        col, row = (min(2, int(3 * (c.min() + c.max() + 1) / 2 / side)) for c, side in zip((xs, ys), image.size))
        place = " ".join(w for w in (("top", "", "bottom")[row], ("left", "", "right")[col]) if w) or "centre"
        assert sample.answer == place
        checked += 1
        if image.size == (64, 64):
            assert place in ("top left", "top right", "bottom left", "bottom right")
    assert checked > 20
    assert grids == {"gridplace": 40, "place": 0}.get(variant, grids) and (variant != "placemix" or 10 < grids < 30)


def test_text_pretraining_set_teaches_reading_from_context(tmp_path):
    from ovis25.demo import TEXT_NUMBERS, TEXT_THINK_PER_TASK, text_only_dataset
    from ovis25.synth import build_world

    build_world(tmp_path / "world", seed=0, sizes="ci")
    text_only_dataset(tmp_path / "world")
    info = json.loads((tmp_path / "world" / "datainfo.json").read_text())
    samples = json.loads((tmp_path / "world" / info["synth_text"]["meta_file"]).read_text())
    numbers = [s for s in samples if s["id"].startswith("text-number-")]
    assert len(numbers) == TEXT_NUMBERS
    for s in numbers:  # the answer is a digit string copied from the prompt, not recalled
        question, answer = (t["value"] for t in s["conversations"])
        assert answer.isdigit() and question == f"the number {answer}\nWhat number is written?"
    assert len({s["conversations"][1]["value"] for s in numbers}) > 1000  # too many strings to memorise
    thinking = [s for s in samples if s["id"].startswith("text-think-")]
    assert len(thinking) == TEXT_THINK_PER_TASK * len(CAPTIONED)
    for s in thinking:  # a trace from the caption, then an answer: the trace's own conclusion
        question, answer = (t["value"] for t in s["conversations"])
        trace, _, final = answer.partition("</think>\n\n")
        words = re.findall(r"[\w.]+", re.sub(r"</?box>", "", final))  # a box's four numbers, a word, a number
        assert trace.startswith("<think>\n") and words and all(w in trace for w in words), answer
    assert all("<image>" not in t["value"] for s in samples for t in s["conversations"])


def test_each_task_is_a_dataset_of_its_own_and_p2_weighs_them(tmp_path):
    from ovis25.demo import RECIPES, task_datasets
    from ovis25.synth import build_world
    from ovis25.train import load_recipe
    from ovis25.train.data import load_datainfo, read_samples

    world = tmp_path / "world"
    build_world(world, seed=0, sizes="ci", tokenizer=False)
    task_datasets(world)
    info = json.loads((world / "datainfo.json").read_text())
    every = read_samples(world / info["synth_qa"]["meta_file"])
    parts = {n: read_samples(world / e["meta_file"]) for n, e in info.items() if n.startswith("synth_qa_")}
    assert sorted(s["id"] for p in parts.values() for s in p) == sorted(s["id"] for s in every)
    assert all(s["task"] == name.removeprefix("synth_qa_") for name, p in parts.items() for s in p)
    task_datasets(world)  # again: nothing changes
    assert json.loads((world / "datainfo.json").read_text()) == info
    # P2's recipe names every task once, spatial and grounding at a quarter
    recipe = load_recipe(RECIPES / "p2.toml", [f'init="{tmp_path}"', f'datainfo="{world / "datainfo.json"}"'])
    ratios = {d.name: d.ratio for d in load_datainfo(recipe.datainfo, recipe.datasets)}
    assert {n for n in ratios if n.startswith("synth_qa_")} == set(parts)
    assert ratios["synth_qa_spatial"] == ratios["synth_qa_grounding"] == 0.25 and ratios["synth_qa_count"] == 1.0


def test_the_long_preset_passes_once_over_its_worlds_questions_from_a_longer_vision_pretraining(tmp_path):
    """--preset long: the look-up phases, its own P2 (every task's questions once, the world's sizes weighing them,
    spatial relations five times), P3 (about as many
    questions as the tiny P3) and P4 (the tiny one exported nearer P3), the tiny recipes for the other phases, P0v
    four times as long; each change shows in the fingerprints of the phases it reaches."""
    from ovis25.demo import LOOKUP_PHASES, lookup_sizes, phase_fingerprints, recipe, vision_config
    from ovis25.synth.build import PRESETS, split_size
    from ovis25.train import load_recipe
    from ovis25.train.data import dataset_entry

    assert [recipe("long", p).name for p in phases("long") if p != "p0v"] == \
        ["p0.toml", "p1.toml", *["lookup.toml"] * 3, "p2.toml", "p3.toml", "p4.toml", "p5.toml"]
    assert [recipe("long", p).parent.name for p in phases("long") if p != "p0v"] == \
        ["tiny", "tiny", "long", "long", "long", "long", "long", "long", "tiny"]
    assert recipe("ci", "p2") == recipe("tiny", "p2") and phases("tiny") == TRAIN_PHASES
    # the look-ups: one pass each over 40000 grid places, 20000 grid relations, 60000 relations on scenes
    assert LOOKUP_PHASES["long"] == {
        "p2a": ("grid_place", 40000), "p2b": ("grid_spatial", 20000), "p2c": ("spatial", 60000)}
    assert lookup_sizes("long")["qa"] == {"grid_place": 40000, "grid_spatial": 20000, "spatial": 60000}
    lookup = load_recipe(recipe("long", "p2a"))
    assert lookup.epochs == 1 and lookup.max_steps is None and not lookup.datasets
    assert replace(lookup, epochs=3, max_steps=2560, datasets=[]) == replace(load_recipe(recipe("tiny", "p2")),
                                                                            datasets=[])
    assert vision_config("long", {}).steps == 4 * vision_config("tiny", {}).steps
    assert vision_config("long", {"max_steps": 3}).steps == 3  # an override still wins
    tiny, long = phase_fingerprints("tiny", 0, {}, {}), phase_fingerprints("long", 0, {}, {})
    assert all(tiny[p] != long[p] for p in TRAIN_PHASES)
    changed = phase_fingerprints("long", 0, {}, {"p2b": {"lr": 1e-4}})  # reaches P2b and every later phase
    assert [p for p in phases("long") if changed[p] != long[p]] == list(phases("long")[4:])
    p2 = load_recipe(recipe("long", "p2"))
    assert p2.epochs == 1 and p2.max_steps is None
    tasks = PRESETS["long"]["qa"]
    assert {d.split(":")[0] for d in p2.datasets} == {"synth_caption", *(f"synth_qa_{t}" for t in tasks)}
    # the sizes weigh the tasks, but spatial relations, drawn 5 times each to keep what the look-ups taught
    assert {d for d in p2.datasets if d.startswith("synth_qa_") and ":" in d} == {"synth_qa_spatial:5"}

    def caption_share(preset: str) -> float:  # of the samples P2 draws
        sizes = PRESETS[preset]
        weights = dict(map(dataset_entry, load_recipe(recipe(preset, "p2")).datasets))
        captions = weights["synth_caption"] * sizes["caption"] * len(CAPTIONED)
        qa = sum(weights[f"synth_qa_{t}"] * split_size(sizes, "qa", t) for t in tasks)
        return captions / (captions + qa)
    assert abs(caption_share("long") / caption_share("tiny") - 1) < 0.15  # 9.4% against 11.0%
    p3_questions = {preset: sum(split_size(PRESETS[preset], "qa", t) for t in tasks) for preset in ("tiny", "long")}
    ratio = {preset: dataset_entry(load_recipe(recipe(preset, "p3")).datasets[0])[1] for preset in p3_questions}
    assert abs(ratio["long"] * p3_questions["long"] / (ratio["tiny"] * p3_questions["tiny"]) - 1) < 0.1  # 12600, 12000
    p4 = {preset: load_recipe(recipe(preset, "p4")) for preset in ("tiny", "long")}
    assert p4["long"].merge_with_init > p4["tiny"].merge_with_init
    assert replace(p4["long"], merge_with_init=p4["tiny"].merge_with_init) == p4["tiny"]


def test_demo_evaluates_each_kind_of_media_at_the_budget_its_recipes_train_with():
    from ovis25.demo import BUDGETS, RECIPES, recipe
    from ovis25.train import load_recipe
    from ovis25.train.trainer import pixel_budgets
    for phase in ("p2", "p3", "p4", "p5"):
        assert pixel_budgets(load_recipe(RECIPES / f"{phase}.toml")) == BUDGETS, phase
        assert pixel_budgets(load_recipe(recipe("long", phase))) == BUDGETS, phase
    p1 = pixel_budgets(load_recipe(RECIPES / "p1.toml"))  # captions: one image each
    assert p1.for_kind("single_image") == BUDGETS.for_kind("single_image")


def test_demo_curves_train_tasks_together_weighed_as_the_demos_p2(tmp_path, monkeypatch):
    """demo_curves.py --together: one run on a world of the tasks and their captions, each task drawn as the demo's
    P2 weighs it (spatial a quarter of its questions), every checkpoint scored per task; the weights are read from
    the recipe."""
    from conftest import model_dir

    assert demo_curves.shares(["synth_caption", "synth_qa_count", "synth_qa_spatial:0.25"], ["count", "spatial"]) \
        == {"count": 1.0, "spatial": 0.25}
    monkeypatch.setattr(demo_curves, "RESULTS", tmp_path / "results")
    demo_curves.main(["--together", "--tasks", "count,spatial", "--questions", "8", "--test", "2", "--eval-every",
                      "1", "--init", str(model_dir()), "--work", str(tmp_path / "work"), "--out", "t",
                      "max_tokens=256", "progress=false"])
    results = json.loads((tmp_path / "results" / "t.json").read_text())
    assert results["together"] and set(results["curves"]) == {"count", "spatial"}
    run = tmp_path / "work" / "together" / "run"
    assert (run / "final" / "config.json").exists() and not (tmp_path / "work" / "count").exists()
    count, spatial = results["curves"]["count"], results["curves"]["spatial"]
    steps = [p["step"] for p in count]
    assert steps == [p["step"] for p in spatial] and steps[0] == 0 and len(steps) >= 3
    assert [p["questions_seen"] for p in (count[-1], spatial[-1])] == [8, 2]  # all of count's, a quarter of spatial's
    assert all(p["n"] == 2 for p in count + spatial)
    world = tmp_path / "work" / "together" / "world"
    captions = json.loads((world / json.loads((world / "datainfo.json").read_text())["synth_caption"]["meta_file"])
                          .read_text())
    assert len(captions) == 2  # 400 per 3000 questions, as in the demo's world: one per task here


def test_targets_score_with_standard_errors_and_the_worlds_own_items_apart():
    rows = [{"id": f"test-ocr-{i:05d}", "task": "ocr", "category": "number of 2" if i % 2 else "word of 3",
             "metric": "exact", "score": float(i % 4 != 1)} for i in range(400)]  # numbers: every other one right
    s = targets.score_target(rows, "ocr", "number", 0.9, 200)
    assert s["n"] == 200 and s["accuracy"] == 0.5 and s["se"] == pytest.approx((0.25 / 200) ** 0.5)
    assert s["world_test_n"] == 100 and s["world_test"] == 0.5 and not s["met"] and s["clearly_short"]
    assert targets.verdict(s) == "clearly short"
    words = targets.score_target(rows, "ocr", "word", 0.9, 200)
    assert words["accuracy"] == 1.0 and words["clearly"] and targets.verdict(words) == "clearly met"
    near = targets.score_target([{**r, "score": float(i % 10 != 0)} for i, r in enumerate(rows)], "ocr", "", 0.9, 200)
    assert near["met"] and not near["clearly"] and targets.verdict(near) == "met"
    # grounding: a hit is a box at IoU >= 0.5, the mean IoU beside it
    boxes = [{"id": f"test-grounding-{i:05d}", "task": "grounding", "metric": "iou", "score": iou}
             for i, iou in enumerate([0.9, 0.5, 0.49, 0.1])]
    s = targets.score_target(boxes, "grounding", "", 0.5, 2)
    assert s["accuracy"] == 0.5 and s["mean_iou"] == pytest.approx(0.4975) and s["world_test"] == 1.0 and s["met"]
    assert "mean_iou" not in words
