"""Why the demo's tiny Ovis does not learn grounding: it can box *an* object, but not pick the one named.

    python benchmarks/grounding_selection.py [--run runs/demo] [--questions 20000] [--objects 1,2,0]
                                             [--swap 40] [key=value ...]   # overrides of the P2 recipe

For each number of objects per image (0: 2-4, the demo's own grounding task), a world of grounding questions
alone, then the P2 recipe from the demo's P1 checkpoint, as `benchmarks/demo_curves.py` trains one task.
Each model is scored on 200 held-out questions (mean IoU, as `ovis25 eval`), and by a swap test: on `--swap`
fresh images of two objects, it is asked for each object in turn; "follows the name" is the share of
answers whose box centre is nearer the named object than the other (0.5: the name is ignored), "same box"
the share of images where both questions get the identical box.

The demo's own P2 (`RUN/p2/final`) is also asked to describe `--swap` fresh scenes of 2-4 objects: of the
objects its captions name that are in the image, the share put in the right one of the nine places
(`synth.world.place_name`; the captions it was trained on say where every object is).

Prints a table and writes benchmarks/results/grounding_selection.json.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from demo_curves import PIXELS, p1_checkpoint, task_curve  # noqa: E402

from ovis25.grounding import Box, parse_boxes  # noqa: E402


def grounding_with(objects: int):
    """The demo's grounding task with `objects` objects per image (0: as the demo draws them)."""
    from ovis25.grounding import format_box
    from ovis25.synth import world

    if not objects:
        return world.grounding

    def draw(rng: random.Random) -> world.Sample:
        kinds = rng.sample(world.KINDS, objects)
        image, objs = world.scene(rng, kinds)
        box = format_box(objs[0].rel_box(*image.size))
        return world.Sample("grounding", [image], f"Where is the <ref>{objs[0].name}</ref>?", box, "iou",
                            caption=world.scene_caption(objs, image.size), wrong=box)
    return draw


def predicted_box(reply: str) -> Box:
    """The reply's first box; without one, a point at the image centre."""
    return (parse_boxes(reply) or [Box(0.5, 0.5, 0.5, 0.5)])[0]


def nearer_named(pred: Box, boxes: list[Box], named: int) -> bool:
    """Is the predicted box's centre nearer the named object's box than every other object's?"""
    d = [math.dist(pred.centre, b.centre) for b in boxes]
    return all(d[named] < x for i, x in enumerate(d) if i != named)


def swap_test(model_dir: Path, n: int, seed: int = 1234) -> dict:
    """Ask for each of two objects in the same image: does the box follow the name?"""
    from ovis25.chat import Chat
    from ovis25.synth import world

    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    follows, same = [], 0
    for _ in range(n):
        image, objs = world.scene(rng, rng.sample(world.KINDS, 2))
        boxes = [Box(*o.rel_box(*image.size)) for o in objs]
        preds = []
        for obj in objs:
            text = chat.generate(f"<image>\nWhere is the <ref>{obj.name}</ref>?", images=[image],
                                 enable_thinking=False, max_new_tokens=32, **PIXELS).text
            preds.append(predicted_box(text))
        same += preds[0] == preds[1]
        follows += [nearer_named(pred, boxes, i) for i, pred in enumerate(preds)]
    return {"follows_name": round(sum(follows) / len(follows), 3), "same_box": round(same / n, 3), "images": n}


def caption_places(model_dir: Path, n: int, seed: int = 7) -> dict:
    """Of the objects a caption names that are in the image, the share put in their place."""
    from ovis25.chat import Chat
    from ovis25.synth import world

    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    named = present = placed = 0
    for _ in range(n):
        kinds = rng.sample(world.KINDS, rng.randint(2, 4))
        image, objs = world.scene(rng, kinds)
        truth = {o.name: world.place_name(o, image.size) for o in objs}
        text = chat.generate("<image>\nDescribe the image.", images=[image], enable_thinking=False,
                             max_new_tokens=80, **PIXELS).text
        for name, place in re.findall(r"a (\w+ \w+) at the ([\w ]+?)(?:,|$)", text):
            named += 1
            present += name in truth
            placed += truth.get(name) == place
    return {"scenes": n, "objects_named": named, "in_the_image": present, "placed_right": placed,
            "share_placed": round(placed / max(present, 1), 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--questions", type=int, default=20000)
    ap.add_argument("--objects", default="1,2,0", help="objects per image, comma-separated (0: 2-4 as the demo)")
    ap.add_argument("--swap", type=int, default=40, help="images of the swap test")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "grounding_selection")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the P2 recipe")
    args = ap.parse_args(argv)
    init = p1_checkpoint(args.run)
    from ovis25.synth import world

    results = {"init": str(init), "questions": args.questions, "overrides": args.overrides,
               "captions_after_p2": caption_places(args.run / "p2" / "final", args.swap), "variants": {}}
    print("captions after the demo's P2:", results["captions_after_p2"], flush=True)
    demo_task = world.TASKS["grounding"]
    for objects in map(int, args.objects.split(",")):
        name = f"{objects} object{'s' * (objects != 1)}" if objects else "2-4 objects (the demo's task)"
        world.TASKS["grounding"] = grounding_with(objects)  # the world builder draws from TASKS
        try:
            points = task_curve("grounding", init, args.work / str(objects), args.questions, 200,
                                args.questions, 0, args.overrides)
        finally:
            world.TASKS["grounding"] = demo_task
        final = args.work / str(objects) / "grounding" / "run" / "final"
        results["variants"][name] = {"before": points[0]["mean_iou"], "mean_iou": points[-1]["mean_iou"],
                                     "train_s": points[-1]["train_s"], **swap_test(final, args.swap)}
        print(name, results["variants"][name], flush=True)
    lines = [f"\ngrounding alone, {args.questions} questions, from {init}:",
             "| objects per image | mean IoU before | after | follows the name | same box for both names | train s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['before']:.2f} | {v['mean_iou']:.2f} | {v['follows_name']:.2f} | {v['same_box']:.2f} | "
              f"{v['train_s']:.0f} |" for k, v in results["variants"].items()]
    c = results["captions_after_p2"]
    lines.append(f"\ncaptions after the demo's P2, {c['scenes']} scenes: {c['in_the_image']} of {c['objects_named']} "
                 f"objects named are in the image, {c['placed_right']} of those in their place ({c['share_placed']:.2f})")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grounding_selection.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'grounding_selection.json'}")


if __name__ == "__main__":
    main()
