"""build_world: determinism, the official on-disk format, placeholder counts, a held-out split."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovis25.synth import PRESETS, TASKS, build_world
from ovis25.synth.__main__ import main
from ovis25.synth.build import CAPTIONED, PAIR_KINDS, build_heldout, pair_kind, task_rng
from ovis25.synth.world import WARMUPS


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    main([str(out), "--preset", "ci", "--seed", "0"])  # the CLI, progress bar included
    return out


def read(world: Path, name: str) -> list[dict]:
    text = (world / name).read_text()
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def visuals(world: Path, row: dict) -> list[Path]:
    paths = row.get("video_frames") or row["image"]
    return [world / "images" / p for p in ([paths] if isinstance(paths, str) else paths)]


def all_rows(world: Path):
    manifest = json.loads((world / "world.json").read_text())
    for name, spec in manifest["datasets"].items():
        for row in read(world, spec["meta_file"]):
            yield name, row
    for split, file in manifest["files"].items():
        for row in read(world, file):
            yield split, row


@pytest.mark.parametrize("workers", [1, 3])
def test_same_seed_byte_identical(world, tmp_path, workers):
    """Whatever the number of processes drawing the streams."""
    again = tmp_path / "again"
    build_world(again, seed=0, sizes="ci", workers=workers)
    a, b = files(world), files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.startswith("tokenizer/") for k in a)


def test_other_seed_differs(world, tmp_path):
    build_world(tmp_path / "other", seed=1, sizes="ci", tokenizer=False)
    other, same = files(tmp_path / "other"), files(world)
    assert other["test.jsonl"] != same["test.jsonl"]
    assert sum(other.get(k) == v for k, v in same.items() if k.endswith(".png")) == 0


def test_a_task_subset_holds_the_same_samples_as_the_full_world(world, tmp_path):
    sub = tmp_path / "sub"
    manifest = build_world(sub, seed=0, sizes="ci", tokenizer=False, tasks=["ocr", "count"])
    assert manifest["tasks"] == ["ocr", "count"]
    full, part = files(world), files(sub)
    pngs = {k for k in part if k.endswith(".png")}
    assert pngs and {k.split("/")[2] for k in pngs} == {"ocr", "count"}
    assert all(part[k] == full[k] for k in pngs)
    keep = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    assert (sub / "test.jsonl").read_text() == "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for t in ("ocr", "count") for r in keep if r["task"] == t)
    with pytest.raises(ValueError, match="tasks: unknown or none \\['chess'\\]"):
        build_world(tmp_path / "bad", sizes="ci", tasks=["count", "chess"])


def test_a_world_of_warm_ups_which_no_default_world_draws(world, tmp_path):
    """The warm-ups (one-token grid questions) are drawn only when asked for, beside a task whose samples are then
    the full world's: the demo's look-up world."""
    assert not set(WARMUPS) & set(json.loads((world / "world.json").read_text())["tasks"])
    sizes = {"qa": {"grid_place": 5, "grid_spatial": 2, "spatial": 4}, "test": 3}
    manifest = build_world(tmp_path / "lookup", seed=0, sizes=sizes, tokenizer=False, tasks=list(sizes["qa"]))
    assert manifest["counts"]["qa"] == sizes["qa"] and manifest["counts"]["test"] == dict.fromkeys(sizes["qa"], 3)
    qa = read(tmp_path / "lookup", "meta/qa.json")
    assert Counter(r["task"] for r in qa) == sizes["qa"]
    grids = [v for r in qa if r["task"] != "spatial" for v in visuals(tmp_path / "lookup", r)]
    assert len(grids) == 7 and all(Image.open(v).size == (64, 64) for v in grids)
    lookup, full = files(tmp_path / "lookup"), files(world)
    spatial = [k for k in lookup if k.endswith(".png") and "/spatial/" in k]
    assert len(spatial) == 7 and all(lookup[k] == full[k] for k in spatial)  # the ci world's 4 qa, 3 test


def test_a_split_can_hold_a_different_number_of_samples_per_task(world, tmp_path):
    """{split: {task: n}}: each task's stream gives its own number (its first n samples, as in any world); tasks
    left out of the dict get none; an unknown task is named."""
    sizes = {"caption": 1, "qa": {"ocr": 6, "count": 1}, "test": 1}
    manifest = build_world(tmp_path / "sized", seed=0, sizes=sizes, tokenizer=False)
    assert manifest["counts"]["qa"] == {"count": 1, "ocr": 6} and manifest["sizes"]["qa"] == sizes["qa"]
    qa = {s["id"]: s for s in read(tmp_path / "sized", "meta/qa.json")}
    assert {s["task"] for s in qa.values()} == {"ocr", "count"}
    full = {s["id"]: s for s in read(world, "meta/qa.json")}  # the ci world's 4 per task: the same first ones
    shared = sorted(set(full) & set(qa))
    assert shared == ["qa-count-00000"] + [f"qa-ocr-{i:05d}" for i in range(4)]
    assert all(qa[i] == full[i] for i in shared)
    assert PRESETS["long"]["qa"]["ocr"] > PRESETS["tiny"]["qa"] and set(PRESETS["long"]["qa"]) == set(TASKS)
    with pytest.raises(ValueError, match=r"sizes\['qa'\]: unknown task\(s\) \['chess'\]"):
        build_world(tmp_path / "bad", sizes={"qa": {"chess": 1}})


def test_manifest_and_datainfo(world):
    manifest = json.loads((world / "world.json").read_text())
    sizes = PRESETS["ci"]
    assert manifest["sizes"] == sizes and manifest["tasks"] == list(TASKS)
    assert manifest["samples"] == {"caption": sizes["caption"] * len(CAPTIONED),
                                   **{s: sizes[s] * len(TASKS) for s in ("qa", "think", "dpo", "grpo", "test")}}
    assert manifest["images"] == len(list((world / "images").rglob("*.png")))
    datainfo = json.loads((world / manifest["datainfo"]).read_text())
    assert set(datainfo) == set(manifest["datasets"]) == {"synth_caption", "synth_qa", "synth_think"}
    for name, entry in datainfo.items():
        assert {"meta_file", "image_dir", "data_format"} <= set(entry)
        assert (world / entry["meta_file"]).is_file() and (world / entry["image_dir"]).is_dir()
        assert len(read(world, entry["meta_file"])) == manifest["datasets"][name]["samples"]
    assert datainfo["synth_caption"]["data_format"] == "caption"
    assert datainfo["synth_caption"]["caption_template"].count("<image>") == 1
    assert {datainfo[n]["data_format"] for n in ("synth_qa", "synth_think")} == {"conversation"}
    for phase in ("p1", "p2", "p3"):
        assert set(manifest["phases"][phase]) <= set(datainfo)


def test_the_trainer_reads_the_datainfo(world):
    from ovis25.train.data import load_datainfo
    specs = {s.name: s for s in load_datainfo(world / "datainfo.json")}
    assert specs["synth_qa"].image_dir == world / "images"
    assert specs["synth_caption"].data_format == "caption"


def test_records_have_official_fields_and_matching_placeholders(world):
    for where, row in all_rows(world):
        assert isinstance(row["id"], str)
        paths = visuals(world, row)
        assert all(p.is_file() for p in paths)
        if where == "synth_caption":
            assert set(row) == {"id", "image", "caption"} and isinstance(row["image"], str) and row["caption"]
            continue
        turns = row["conversations"]
        assert turns[0]["from"] == "human" and all(t["from"] in ("human", "gpt") for t in turns)
        prompt = "".join(t["value"] for t in turns if t["from"] == "human")
        if "video_frames" in row:
            assert "image" not in row and prompt.count("<video>") == 1 and "<image>" not in prompt
            assert 4 <= len(paths) <= 6 and len({Image.open(p).size for p in paths}) == 1
        else:
            assert prompt.count("<image>") == len(paths) and "<video>" not in prompt
            assert isinstance(row["image"], str) == (len(paths) == 1)
        assert row["task"] in TASKS


def test_split_specific_fields(world):
    rows = {}
    for where, row in all_rows(world):
        rows.setdefault(where, []).append(row)
    for row in rows["synth_qa"]:
        assert [t["from"] for t in row["conversations"]] == ["human", "gpt"]
        assert "<think>" not in row["conversations"][1]["value"]
    corrected = 0
    for row in rows["synth_think"]:
        value = row["conversations"][-1]["value"]
        assert re.fullmatch(r"<think>\n(.+\n)+</think>\n\n[^\n]+", value), value
        corrected += "Wait, let me" in value
    assert 0 < corrected < len(rows["synth_think"])
    kinds = Counter()
    for row in rows["dpo"]:
        assert len(row["conversations"]) == 1 and row["chosen"] and row["rejected"] != row["chosen"]
        modes = {"<think>" in row["chosen"], "<think>" in row["rejected"]}
        assert modes == {row["kind"] != "answer"}, "both sides of a pair are in the pair's mode"
        chosen_trace, chosen_answer = row["chosen"].rsplit("\n\n", 1) if modes == {True} else ("", row["chosen"])
        rejected_trace, rejected_answer = row["rejected"].rsplit("\n\n", 1) if modes == {True} else ("", row["rejected"])
        assert chosen_answer != rejected_answer
        assert (chosen_trace == rejected_trace) == (row["kind"] != "misled"), row  # only "misled" changes the trace
        kinds[row["kind"]] += 1
    assert set(kinds) <= set(PAIR_KINDS) and len(kinds) > 1, kinds
    for row in rows["grpo"]:
        assert row["reward"] in ("exact", "number", "iou") and row["answer"]
        assert (row["reward"] == "iou") == (row["task"] == "grounding")
    for row in rows["test"]:
        assert row["metric"] in ("exact", "number", "iou")
        assert row["conversations"][0]["value"].endswith(row["question"])
        # the category says what the answer and question show
        category, answer = row["category"], row["answer"]
        if row["task"] == "count":
            assert category == f"{answer} to count"
        elif row["task"] == "ocr":
            assert category == f"{'number' if answer.isdigit() else 'word'} of {len(answer)}"
        elif row["task"] == "chart":
            assert category == ("highest bar" if row["question"] == "Which bar is highest?" else
                                "add two bars" if " plus " in row["question"] else "read a bar")
        elif row["task"] == "attribute":
            assert category == f"asks the {'color' if 'color' in row['question'] else 'shape'}"
        elif row["task"] == "video":
            assert category == f"{len(row['video_frames'])} frames"
    assert len({r["category"] for r in rows["test"] if r["task"] == "ocr"}) > 2


def test_pair_kinds_take_their_shares():
    draws = [pair_kind((i + 0.5) / 600) for i in range(600)]
    assert {k: draws.count(k) / 600 for k in PAIR_KINDS} == pytest.approx(PAIR_KINDS)
    assert pair_kind(0.0) == next(iter(PAIR_KINDS)) and pair_kind(1 - 1e-12) == list(PAIR_KINDS)[-1]


def test_files_hold_what_the_generators_drew(world):
    """The qa split on disk is exactly the generators' stream, whose answers test_synth_world verifies."""
    rows = {r["id"]: r for r in read(world, "meta/qa.json")}
    for task in TASKS:
        rng = task_rng(0, "qa", task)
        for i in range(PRESETS["ci"]["qa"]):
            sample, row = TASKS[task](rng), rows[f"qa-{task}-{i:05d}"]
            assert row["conversations"][1]["value"] == sample.answer
            for image, path in zip(sample.images, visuals(world, row), strict=True):
                assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def sha1(path: Path) -> str:
    image = Image.open(path)
    return hashlib.sha1(repr(image.size).encode() + image.tobytes()).hexdigest()


def test_held_out_images_never_seen_in_training(world):
    train, test = set(), set()
    for where, row in all_rows(world):
        (test if where == "test" else train).update(sha1(p) for p in visuals(world, row))
    assert test and not test & train


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_world(tmp_path, sizes="ci")
    with pytest.raises(ValueError, match="unknown preset"):
        build_world(tmp_path / "w", sizes="huge")


def test_a_larger_held_out_split_extends_the_worlds_own(world, tmp_path):
    """Its first items per task are the world's test items, byte for byte; the rest are new, none of them a
    training image, and the world is left untouched."""
    before = files(world)
    out = tmp_path / "heldout"
    main([str(out), "--heldout-of", str(world), "--per-task", "7", "--tasks", "count", "video"])
    assert files(world) == before
    own = {r["id"]: r for r in read(world, "test.jsonl")}
    rows = read(out, "test.jsonl")
    assert Counter(r["task"] for r in rows) == {"count": 7, "video": 7}
    n = PRESETS["ci"]["test"]
    first = [r for r in rows if int(r["id"].rsplit("-", 1)[1]) < n]
    assert len(first) == 2 * n and all(r == own[r["id"]] for r in first)
    for r in first:
        assert [p.read_bytes() for p in visuals(out, r)] == [p.read_bytes() for p in visuals(world, r)]
    train = {digest for where, row in all_rows(world) if where != "test" for digest in map(sha1, visuals(world, row))}
    new = {digest for r in rows if r not in first for digest in map(sha1, visuals(out, r))}
    assert len(new) >= 8 and not new & train
    assert json.loads((out / "heldout.json").read_text())["counts"] == {"count": 7, "video": 7}


def test_a_held_out_split_refuses_bad_requests(world, tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "h"), "--heldout-of", str(world)])  # no --per-task
    with pytest.raises(ValueError, match="unknown or none"):
        build_heldout(world, tmp_path / "h", 5, tasks=["juggling"])
    with pytest.raises(ValueError, match="beside the world"):
        build_heldout(world, world, 5)
    with pytest.raises(ValueError, match="nowhere: not a synthetic world"):
        build_heldout(tmp_path / "nowhere", tmp_path / "h", 5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_heldout(world, tmp_path / "mine", 5)
