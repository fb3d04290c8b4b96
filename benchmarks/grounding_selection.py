"""Why the demo's tiny Ovis does not learn grounding: it can box *an* object, but not pick the one named.

    python benchmarks/grounding_selection.py [--run runs/demo | --init DIR] [--questions 20000] [--objects 1,2,0,grid]
                                             [--swap 40] [--out NAME] [key=value ...]   # overrides of P2's recipe

For each number of objects per image (0: 2-4, the demo's own grounding task; grid: 2-4, half the images a 64 x
64 grid with each object alone in one visual token, the look-up's easy form), a world of grounding questions
alone, then the P2 recipe from the demo's P1 checkpoint, as `benchmarks/demo_curves.py` trains one task.
Each model is scored on 200 held-out questions (mean IoU, as `ovis25 eval`), and by a swap test: on `--swap`
fresh images of two objects, it is asked for each object in turn; "follows the name" is the share of
answers whose box centre is nearer the named object than the other (0.5: the name is ignored), "same box"
the share of images where both questions get the identical box. The grid variant takes the swap test on
one-token grids of two objects too ("on grids"): does it follow the name where the look-up is easy?
The place variants ask for the named object's place instead of its box ("Which part of the image is the red
circle in?" -> "top left", `synth.world.place_name`), an answer of one or two words: on one-token grids only
(gridplace), half the images (placemix) or the demo's scenes (place). Their swap test asks for both objects of
an image whose places differ: "right" the share of answers naming the asked object's place, "other" the other
object's. `--init DIR` starts from another checkpoint than the run's P1, e.g. a variant's final model.

The demo's own P2 (`RUN/p2/final`, where the run has one) is also asked to describe `--swap` fresh scenes of
2-4 objects: of the objects its captions name that are in the image, the share put in the right one of the
nine places (`synth.world.place_name`; the captions it was trained on say where every object is).

Prints a table and writes benchmarks/results/NAME.json (NAME: grounding_selection unless --out says).
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
from demo_curves import PIXELS, p1_checkpoint, task_curves  # noqa: E402

from ovis25.grounding import Box, parse_boxes  # noqa: E402
from ovis25.synth.world import PLACE_QUESTION, grid_scene  # noqa: E402


GRID_SHARE = {"grid": 0.5, "gridplace": 1.0, "placemix": 0.5, "place": 0.0}  # 2-4 objects, this share on grids
PLACE_VARIANTS = ("gridplace", "placemix", "place")  # the named object's place asked, not its box


def grounding_with(variant: str):
    """The demo's grounding task with `variant` objects per image ("0": 2-4 as the demo draws them), or 2-4 with
    a `GRID_SHARE` of the images one-token grids (`grid_scene`), the `PLACE_VARIANTS` asking for the named
    object's place instead of its box."""
    from ovis25.grounding import format_box
    from ovis25.synth import world

    if variant == "0":
        return world.grounding

    def draw(rng: random.Random) -> world.Sample:
        if variant in GRID_SHARE:
            kinds = rng.sample(world.KINDS, rng.randint(2, 4))
            image, objs = (grid_scene if rng.random() < GRID_SHARE[variant] else world.scene)(rng, kinds)
        else:
            image, objs = world.scene(rng, rng.sample(world.KINDS, int(variant)))
        if variant in PLACE_VARIANTS:
            return world.place_question("grounding", image, objs)
        box = objs[0].rel_box(*image.size)
        answer = format_box(box)
        return world.Sample("grounding", [image], f"Where is the <ref>{objs[0].name}</ref>?", answer, "iou",
                            caption=world.scene_caption(objs, image.size), wrong=answer,
                            meta={"target": objs[0].to_dict(), "box": list(box),
                                  "objects": [o.to_dict() for o in objs]})
    return draw


VARIANT_NAMES = {"0": "2-4 objects (the demo's task)", "1": "1 object",
                 "grid": "2-4 objects, half the images one-token grids",
                 "gridplace": "the place named, one-token grids only",
                 "placemix": "the place named, half the images one-token grids",
                 "place": "the place named, the demo's scenes"}


def predicted_box(reply: str) -> Box:
    """The reply's first box; without one, a point at the image centre."""
    return (parse_boxes(reply) or [Box(0.5, 0.5, 0.5, 0.5)])[0]


def nearer_named(pred: Box, boxes: list[Box], named: int) -> bool:
    """Is the predicted box's centre nearer the named object's box than every other object's?"""
    d = [math.dist(pred.centre, b.centre) for b in boxes]
    return all(d[named] < x for i, x in enumerate(d) if i != named)


def swap_test(model_dir: Path, n: int, seed: int = 1234, grid: bool = False) -> dict:
    """Ask for each of two objects in the same image (a one-token grid with `grid`): does the box follow the
    name?"""
    from ovis25.chat import Chat
    from ovis25.synth import world

    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    follows, same = [], 0
    for _ in range(n):
        image, objs = (grid_scene if grid else world.scene)(rng, rng.sample(world.KINDS, 2))
        boxes = [Box(*o.rel_box(*image.size)) for o in objs]
        preds = []
        for obj in objs:
            text = chat.generate(f"<image>\nWhere is the <ref>{obj.name}</ref>?", images=[image],
                                 enable_thinking=False, max_new_tokens=32, **PIXELS).text
            preds.append(predicted_box(text))
        same += preds[0] == preds[1]
        follows += [nearer_named(pred, boxes, i) for i, pred in enumerate(preds)]
    return {"follows_name": round(sum(follows) / len(follows), 3), "same_box": round(same / n, 3), "images": n}


def place_swap_test(model_dir: Path, n: int, seed: int = 1234, grid: bool = False) -> dict:
    """Ask for the place of each of two objects in different places of one image (a one-token grid with
    `grid`): "right" the share of answers naming the asked object's place, "other" the other object's."""
    from ovis25.chat import Chat
    from ovis25.synth import world

    chat = Chat.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    right = other = same = 0
    for _ in range(n):
        while True:
            image, objs = (grid_scene if grid else world.scene)(rng, rng.sample(world.KINDS, 2))
            places = [world.place_name(o, image.size) for o in objs]
            if places[0] != places[1]:
                break
        answers = [chat.generate(f"<image>\n{PLACE_QUESTION.format(o.name)}", images=[image],
                                 enable_thinking=False, max_new_tokens=8, **PIXELS).text.strip() for o in objs]
        same += answers[0] == answers[1]
        right += sum(a == p for a, p in zip(answers, places))
        other += sum(a == p for a, p in zip(answers, reversed(places)))
    return {"right": round(right / (2 * n), 3), "other": round(other / (2 * n), 3), "same_answer": round(same / n, 3),
            "images": n}


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
    ap.add_argument("--init", type=Path, help="start from this checkpoint instead of the run's P1 (e.g. a variant's)")
    ap.add_argument("--questions", type=int, default=20000)
    ap.add_argument("--objects", default="1,2,0",
                    help="objects per image, comma-separated (0: 2-4 as the demo; grid: 2-4, half in one-token grids;"
                         " gridplace, placemix, place: the named object's place asked, on grids, half, none)")
    ap.add_argument("--swap", type=int, default=40, help="images of the swap test")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "grounding_selection")
    ap.add_argument("--out", default="grounding_selection", help="results name")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the P2 recipe")
    args = ap.parse_args(argv)
    init = p1_checkpoint(args.run, args.init)
    from ovis25.synth import world

    p2 = args.run / "p2" / "final"
    results = {"init": str(init), "questions": args.questions, "overrides": args.overrides,
               "captions_after_p2": caption_places(p2, args.swap) if (p2 / "config.json").exists() else None,
               "variants": {}}
    print("captions after the demo's P2:", results["captions_after_p2"], flush=True)
    demo_task = world.TASKS["grounding"]
    for variant in args.objects.split(","):
        if variant not in VARIANT_NAMES and not variant.isdigit():
            raise SystemExit(f"--objects {variant!r}: a number of objects per image, or one of {list(VARIANT_NAMES)}")
        name = VARIANT_NAMES.get(variant, f"{variant} objects")
        world.TASKS["grounding"] = grounding_with(variant)  # the world builder draws from TASKS
        try:
            every = 150 if variant in PLACE_VARIANTS else args.questions  # short answers: a curve is cheap
            points = task_curves(["grounding"], init, args.work / variant / "grounding", args.questions, 200,
                                 every, 0, args.overrides)["grounding"]
        finally:
            world.TASKS["grounding"] = demo_task
        final = args.work / variant / "grounding" / "run" / "final"
        if variant in PLACE_VARIANTS:
            results["variants"][name] = {"curve": [(p["questions_seen"], round(p["accuracy"], 3)) for p in points],
                                         "train_s": points[-1]["train_s"],
                                         "scenes": place_swap_test(final, args.swap),
                                         "grids": place_swap_test(final, args.swap, grid=True)}
            print(name, results["variants"][name], flush=True)
            continue
        results["variants"][name] = {"before": points[0]["mean_iou"], "mean_iou": points[-1]["mean_iou"],
                                     "train_s": points[-1]["train_s"], **swap_test(final, args.swap)}
        if variant == "grid":  # does it follow the name where the look-up is easy?
            on_grids = swap_test(final, args.swap, grid=True)
            results["variants"][name] |= {"follows_name_on_grids": on_grids["follows_name"],
                                          "same_box_on_grids": on_grids["same_box"]}
        print(name, results["variants"][name], flush=True)
    boxes = {k: v for k, v in results["variants"].items() if "mean_iou" in v}
    places = {k: v for k, v in results["variants"].items() if "curve" in v}
    lines = [f"\ngrounding alone, {args.questions} questions, from {init}:"]
    if boxes:
        lines += ["| objects per image | mean IoU before | after | follows the name | same box for both names "
                  "| train s |", "|---|---|---|---|---|---|"]
        grids = {k: f" (on grids {v['follows_name_on_grids']:.2f})" for k, v in boxes.items()
                 if "follows_name_on_grids" in v}
        lines += [f"| {k} | {v['before']:.2f} | {v['mean_iou']:.2f} | {v['follows_name']:.2f}{grids.get(k, '')} | "
                  f"{v['same_box']:.2f} | {v['train_s']:.0f} |" for k, v in boxes.items()]
    if places:
        lines += ["\n| place questions | held-out accuracy by questions seen | scenes: right / other's / same answer "
                  "| grids: right / other's / same answer |", "|---|---|---|---|"]
        lines += [f"| {k} | {', '.join(f'{a:.2f}' for _, a in v['curve'])} | "
                  + " | ".join(f"{v[s]['right']:.2f} / {v[s]['other']:.2f} / {v[s]['same_answer']:.2f}"
                               for s in ("scenes", "grids")) + " |" for k, v in places.items()]
    if c := results["captions_after_p2"]:
        lines.append(f"\ncaptions after the demo's P2, {c['scenes']} scenes: {c['in_the_image']} of "
                     f"{c['objects_named']} objects named are in the image, {c['placed_right']} of those in their "
                     f"place ({c['share_placed']:.2f})")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / (args.out + '.json')}")


if __name__ == "__main__":
    main()
