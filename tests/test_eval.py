"""The evaluation harness on a generic JSONL benchmark: loading and its errors, scoring per task (exact and
IoU), seeded sampled rewards, and the `ovis25 eval` command line."""
import json
import re

import pytest
import torch
from PIL import Image

from conftest import model_dir, requires_fixtures
from ovis25.chat import Chat
from ovis25.eval import (constant_answer_baseline, evaluate, format_category_table, format_table, load_items, main,
                         same_media_batches, sampled_reward, summarize)
from ovis25.processing import PixelBudgets

pytestmark = [requires_fixtures, pytest.mark.usefixtures("single_thread")]
PIXELS = {"min_pixels": 32 * 32, "max_pixels": 64 * 64}
BUDGETS = PixelBudgets.uniform(**PIXELS)


@pytest.fixture(scope="module")
def chat():
    return Chat.from_pretrained(model_dir())


def write_bench(root, rows):
    (root / "img").mkdir(exist_ok=True)
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (48, 40), colour).save(root / "img" / f"{i}.png")
    path = root / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy(chat, items):
    return [r.text for r in chat.generate_batch([it.conversations for it in items], images=[it.images for it in items],
                                                max_new_tokens=6, **PIXELS)]


def test_accuracy_per_task_counts_exact_hits_and_iou(tmp_path, chat):
    rows = [{"id": "q0", "task": "read", "image": "img/0.png", "question": "What colour?", "answer": "?"},
            {"id": "q1", "task": "read", "image": "img/1.png", "question": "What colour?", "answer": "?"},
            {"id": "q2", "task": "read", "image": ["img/0.png", "img/2.png"], "question": "Same?", "answer": "?"},
            {"id": "g0", "task": "find", "image": "img/2.png", "question": "Where is it?", "metric": "iou",
             "answer": "<box>(0.1,0.1),(0.5,0.5)</box>"}]
    items = load_items(write_bench(tmp_path, rows))
    assert [len(it.images) for it in items] == [1, 1, 2, 1] and items[0].images[0] == tmp_path / "img" / "0.png"
    assert items[0].conversations == [{"from": "human", "value": "<image>\nWhat colour?"}]
    answers = greedy(chat, items[:3])
    rows[0]["answer"], rows[2]["answer"] = answers[0], answers[2] + " "  # hits (normalised), q1 stays a miss
    rows[1]["answer"] = answers[1] + " and more"
    summary, scored = evaluate(chat, load_items(write_bench(tmp_path, rows)), False, max_new_tokens=6,
                               progress=False, budgets=BUDGETS)
    assert summary["read"] == {"accuracy": pytest.approx(2 / 3), "n": 3, "thinking": False}
    assert summary["find"]["n"] == 1 and summary["find"]["accuracy"] == (scored[3]["score"] >= 0.5)
    assert summary["find"]["mean_iou"] == scored[3]["score"]
    assert [r["id"] for r in scored] == ["q0", "q1", "q2", "g0"] and [r["response"] for r in scored[:3]] == answers


def test_bad_benchmark_lines_name_the_line_and_field(tmp_path):
    good = {"id": "a", "image": "img/0.png", "question": "Q?", "answer": "x"}
    cases = [({"id": "b", "question": "Q?"}, "line 2: missing field(s) answer"),
             ({"id": "b", "answer": "x"}, "line 2: missing field(s) question"),
             ({**good, "metric": "bleu"}, "line 2: unknown metric 'bleu'")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_items(write_bench(tmp_path, [good, bad]))
    (tmp_path / "bench.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_items(tmp_path / "bench.jsonl")


def test_limit_per_task_keeps_the_first_items_of_each_task(tmp_path):
    rows = [{"id": f"{t}{i}", "task": t, "question": "Q?", "answer": "x"} for t in "ab" for i in range(3)]
    items = load_items(write_bench(tmp_path, rows), limit_per_task=2)
    assert [it.id for it in items] == ["a0", "a1", "b0", "b1"]


def test_sampled_reward_is_seeded_and_leaves_the_global_rng_alone(tmp_path, chat):
    rows = [{"id": f"q{i}", "task": "read", "image": f"img/{i}.png", "question": "What colour?", "answer": "?"}
            for i in range(3)]
    items = load_items(write_bench(tmp_path, rows))
    answers = greedy(chat, items)
    for row, answer in zip(rows, answers):
        row["answer"] = answer
    items = load_items(write_bench(tmp_path, rows))
    state = torch.get_rng_state()
    first = sampled_reward(chat, items, samples=4, max_new_tokens=6, seed=1, budgets=BUDGETS)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == sampled_reward(chat, items, samples=4, max_new_tokens=6, seed=1, budgets=BUDGETS)
    assert first["read"]["n"] == 12 and len(first["read"]["item_rewards"]) == 3
    assert sum(first["read"]["item_rewards"]) / 3 == pytest.approx(first["read"]["reward"])
    # each answer has its own seed: batching (here one item per batch) changes nothing
    assert first == sampled_reward(chat, items, samples=4, max_new_tokens=6, seed=1, batch_size=4, budgets=BUDGETS)
    # near-zero temperature samples the greedy answer: every sample scores
    cold = sampled_reward(chat, items, samples=2, temperature=1e-4, max_new_tokens=6, budgets=BUDGETS)
    assert cold["read"] == {"reward": 1.0, "n": 6, "item_rewards": [1.0, 1.0, 1.0]}


def test_each_kind_of_media_is_evaluated_at_its_own_budget(tmp_path, chat):
    """One image, several images and video frames each get their kind's budget (as the training recipes give
    them), in batches of one kind; the rows equal those of evaluating each kind alone at its budget."""
    rows = [{"id": "one", "task": "t", "image": "img/0.png", "question": "Q?", "answer": "x"},
            {"id": "two", "task": "t", "image": ["img/0.png", "img/1.png"], "question": "Q?", "answer": "x"},
            {"id": "clip", "task": "t", "video_frames": ["img/0.png", "img/1.png"], "question": "Q?", "answer": "x"},
            {"id": "one'", "task": "t", "image": "img/2.png", "question": "Q?", "answer": "x"}]
    items = load_items(write_bench(tmp_path, rows))  # 48x40 images
    budgets = PixelBudgets(single_image_min_pixels=96 * 96, single_image_max_pixels=128 * 128,
                           multiple_image_min_pixels=32 * 32, multiple_image_max_pixels=64 * 64,
                           video_min_pixels=32 * 32, video_max_pixels=32 * 64)
    runs = [([it.id for it in chunk], pixels) for chunk, pixels in same_media_batches(items, 16, budgets)]
    assert runs == [(["one"], {"min_pixels": 9216, "max_pixels": 16384}),
                    (["two"], {"min_pixels": 1024, "max_pixels": 4096}),
                    (["clip"], {"min_pixels": 1024, "max_pixels": 2048}),
                    (["one'"], {"min_pixels": 9216, "max_pixels": 16384})]
    assert [len(c) for c, _ in same_media_batches(items[:1] * 5, 2, budgets)] == [2, 2, 1]
    _, scored = evaluate(chat, items, False, max_new_tokens=4, progress=False, budgets=budgets)
    alone = []
    for kind, index in (("single_image", 0), ("multiple_image", 1), ("video", 2), ("single_image", 3)):
        uniform = PixelBudgets.uniform(*budgets.for_kind(kind))
        alone += evaluate(chat, items[index:index + 1], False, max_new_tokens=4, progress=False, budgets=uniform)[1]
    assert scored == alone
    # the budget reaches the prompt: the pair and the clip at the single-image budget have more visual tokens
    single = PixelBudgets.uniform(*budgets.for_kind("single_image"))
    larger = evaluate(chat, items[1:3], False, max_new_tokens=4, progress=False, budgets=single)[1]
    assert all(big["prompt_tokens"] > small["prompt_tokens"] for big, small in zip(larger, scored[1:3]))


def test_command_line_writes_json_and_reports_bad_files(tmp_path, capsys):
    bench = write_bench(tmp_path, [{"id": "a", "task": "t", "image": "img/0.png", "question": "Q?", "answer": "x"}])
    out, answers = tmp_path / "out.json", tmp_path / "answers.jsonl"
    main([str(model_dir()), "--data", str(bench), "--thinking", "both", "--max-new-tokens", "4", "--out", str(out),
          "--answers", str(answers)])
    results = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert results["thinking off"]["t"]["n"] == 1 and "| t |" in printed and "constant answer |" in printed
    assert "constant answer" not in results  # a guessing level, not a mode of the model
    assert "By category" not in printed  # the items have none
    rows = [json.loads(line) for line in answers.read_text().splitlines()]  # one per item and mode
    assert [(r["id"], r["enable_thinking"]) for r in rows] == [("a", False), ("a", True)]
    for row, mode in zip(rows, ("off", "on")):
        assert row["score"] == results[f"thinking {mode}"]["t"]["accuracy"] and row["answer"] == "x"
    # per-kind budgets: a clip at its own, the image at --min/--max-pixels; categories printed apart
    clip = {"id": "c", "task": "t", "video_frames": ["img/0.png", "img/1.png"], "question": "Q?", "answer": "x",
            "category": "clip"}
    bench = write_bench(tmp_path, [{"id": "a", "task": "t", "image": "img/0.png", "question": "Q?", "answer": "x"}, clip])
    main([str(model_dir()), "--data", str(bench), "--thinking", "off", "--max-new-tokens", "2", "--answers", str(answers),
          "--min-pixels", "4096", "--max-pixels", "16384", "--video-min-pixels", "1024", "--video-max-pixels", "2048"])
    budgets = PixelBudgets(4096, 16384, 4096, 16384, 1024, 2048)
    expected = evaluate(Chat.from_pretrained(model_dir()), load_items(bench), False, 2, progress=False, budgets=budgets)[1]
    assert [json.loads(line)["prompt_tokens"] for line in answers.read_text().splitlines()] == \
        [r["prompt_tokens"] for r in expected]
    assert "By category" in (printed := capsys.readouterr().out) and "| t | clip |" in printed
    assert [json.loads(line).get("category") for line in answers.read_text().splitlines()] == [None, "clip"]
    bench.write_text('{"id": "a"}\n')
    with pytest.raises(SystemExit, match="line 1: missing field"):
        main([str(model_dir()), "--data", str(bench)])
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nowhere'}/test.jsonl: no such benchmark file"):
        main([str(model_dir()), "--suite", "synth", "--world", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):  # argparse's error: no empty table for --limit 0
        main([str(model_dir()), "--data", str(bench), "--limit", "0"])
    assert "--limit: expected a positive integer, got '0'" in capsys.readouterr().err


def test_constant_answer_baseline_is_the_best_single_answer():
    row = {"response": "ignored", "score": 0.0}
    counts = [{**row, "task": "count", "metric": "number", "answer": a} for a in ["3", "3", "2", "3.0"]]
    left, right = "<box>(0.0,0.0),(0.5,1.0)</box>", "<box>(0.5,0.0),(1.0,1.0)</box>"
    boxes = [{**row, "task": "ground", "metric": "iou", "answer": a} for a in [left, left, right, left]]
    base = constant_answer_baseline(counts + boxes)
    assert base["count"] == {"accuracy": 0.75, "n": 4, "thinking": False}  # "3" also scores "3.0" as a number
    # the left box: three exact hits and one box it does not overlap (hit = IoU >= 0.5)
    assert base["ground"]["accuracy"] == 0.75 and base["ground"]["mean_iou"] == pytest.approx(0.75)
    middle = "<box>(0.25,0.0),(0.75,1.0)</box>"  # overlaps the right box by a third: partial IoU counts
    base = constant_answer_baseline([{**r, "answer": middle} for r in boxes[:1]] + boxes[2:3])
    assert base["ground"]["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)


def test_answers_without_a_box_are_counted_apart_from_bad_aim():
    rows = [{"task": "ground", "metric": "iou", "answer": "<box>(0.0,0.0),(0.5,1.0)</box>", "score": 0.0,
             "response": response} for response in
            ["<box>(0.6,0.0),(1.0,1.0)</box>", "<box>(0.300,It spans.\n00),(0.500,", "<think>\n<box>(0.1,0.1),(0.2,0.2)</box>"
             "\n</think>\n\nno idea", "<box>(0.1,0.1),(0.2,0.2)</box>"]]
    summary = summarize(rows, False)
    assert summary["ground"]["with_box"] == 0.5  # a box only inside the trace does not count
    assert format_table({"p4": summary}).endswith("| ground | 0.00 (IoU 0.00) no box in 0.50 |")
    assert "no box" not in format_table({"p4": summarize(rows[:1] + rows[3:], False)})


def test_items_with_categories_are_also_scored_per_category(tmp_path):
    rows = [{"id": f"q{i}", "task": "count", "question": "How many?", "answer": "1", "category": category}
            for i, category in enumerate(["2 to count", "1 to count", "2 to count"])]
    rows.append({"id": "r0", "task": "read", "question": "What?", "answer": "x"})
    items = load_items(write_bench(tmp_path, rows))
    assert [it.category for it in items] == ["2 to count", "1 to count", "2 to count", ""]
    scored = [{"task": it.task, "metric": "exact", "score": score, "category": it.category}
              for it, score in zip(items[:3], [1.0, 0.0, 0.0])]
    scored.append({"task": "read", "metric": "exact", "score": 1.0})
    summary = summarize(scored, False)
    assert summary["count"]["categories"] == {"1 to count": {"accuracy": 0.0, "n": 1},
                                              "2 to count": {"accuracy": 0.5, "n": 2}}
    assert "categories" not in summary["read"]
    table = format_category_table({"p2": summary, "p3": {"count": summary["count"]}})
    assert table.splitlines()[2:] == ["| count | 1 to count | 0.00 | 0.00 | 1 |", "| count | 2 to count | 0.50 | 0.50 | 2 |"]
    assert format_category_table({"p2": summarize(scored[3:], False)}) == ""
