"""Does the demo's model find an object by the word that names it? A swap test on its attribute questions.

    python benchmarks/attribute_lookup.py [--run runs/demo] [--seed 0] [--phases p2,p5] [--out NAME]

Every held-out attribute question whose scene has two or three objects is asked once for each object in it:
"What color is the <its shape>?" or "What shape is the <its colour> object?", whichever kind the question was
(the scenes are the generator's own, drawn again from the test stream's seed, so every object is known). A
model that finds the object named answers every one right; one that ignores the name gives the same answer
whatever object is named ("same answer": the share of scenes where it does).

Prints a table and writes benchmarks/results/NAME.json (default attribute_lookup).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ovis25.chat import Chat
from ovis25.demo import BUDGETS
from ovis25.synth.build import task_rng
from ovis25.synth.world import TASKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def swapped_questions(world: Path, seed: int) -> list[dict]:
    """One group per multi-object test scene: its image, the kind asked and a (question, answer) per object."""
    items = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    items = [it for it in items if it["task"] == "attribute"]
    rng = task_rng(seed, "test", "attribute")
    groups = []
    for it in items:
        sample = TASKS["attribute"](rng)
        if (sample.question, sample.answer) != (it["question"], it["answer"]):
            raise SystemExit(f"{world}: test item {it['id']} is not the generator's (another seed? pass --seed)")
        objects, asked = sample.meta["objects"], sample.meta["asked"]
        if len(objects) < 2:
            continue
        pairs = [(f"What color is the {o['shape']}?", o["color"]) if asked == "color" else
                 (f"What shape is the {o['color']} object?", o["shape"]) for o in objects]
        groups.append({"image": str(world / "images" / it["image"]), "asked": asked, "pairs": pairs})
    return groups


def score(chat: Chat, groups: list[dict]) -> dict[str, dict]:
    """Per kind asked: the share of questions answered right, of scenes with every question right, and of
    scenes given the same answer whatever object was named."""
    flat = [(g["image"], q) for g in groups for q, _ in g["pairs"]]
    answers = []
    for i in range(0, len(flat), 32):
        chunk = flat[i:i + 32]
        answers += [r.text.strip() for r in chat.generate_batch(
            [[{"from": "human", "value": "<image>\n" + q}] for _, q in chunk], images=[[im] for im, _ in chunk],
            max_new_tokens=8, **BUDGETS.for_media(1, 0))]
    out: dict[str, dict] = {}
    k = 0
    for g in groups:
        got = answers[k:k + len(g["pairs"])]
        k += len(g["pairs"])
        s = out.setdefault(g["asked"], {"questions": 0, "right": 0, "scenes": 0, "all_right": 0, "same_answer": 0})
        s["questions"] += len(got)
        s["right"] += sum(a == truth for a, (_, truth) in zip(got, g["pairs"]))
        s["scenes"] += 1
        s["all_right"] += all(a == truth for a, (_, truth) in zip(got, g["pairs"]))
        s["same_answer"] += len(set(got)) == 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs/demo")
    ap.add_argument("--phases", default="p2,p5")
    ap.add_argument("--seed", type=int, default=0, help="the seed the run's world was built with")
    ap.add_argument("--out", default="attribute_lookup")
    args = ap.parse_args()
    groups = swapped_questions(args.run / "world", args.seed)
    results = {}
    print("| model | asked | questions right | scenes all right | same answer for every object | scenes |")
    print("|---|---|---|---|---|---|")
    for phase in args.phases.split(","):
        chat = Chat.from_pretrained(args.run / phase / "final", dtype=torch.float32)
        results[phase] = score(chat, groups)
        for asked, s in results[phase].items():
            print(f"| {phase} | {asked} | {s['right'] / s['questions']:.2f} | {s['all_right'] / s['scenes']:.2f} | "
                  f"{s['same_answer'] / s['scenes']:.2f} | {s['scenes']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"run": str(args.run), "results": results}, indent=2))


if __name__ == "__main__":
    main()
