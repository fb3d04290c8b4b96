"""Can the demo's LLM learn to look up a named object, from text alone?

    python benchmarks/text_lookup.py [MODEL_DIR] [--conversations 4000] [--chunks 4] [--epochs 4] [--lr 3e-3]
                                     [--fresh] [--qk-scale 1] [--rope-theta T] [--qk-norm-phase-in A B]
                                     [--probe 300] [--out NAME]

Grounding, spatial relations and "the colour of the named shape" all need the LLM to find the object a
question names and read something off it. This asks whether the LLM can learn that where nothing else is in
the way: a scene's caption (objects in random order) in the context, then each of its 2-3 objects asked
about in turn, one turn each ("What color is the square?" -> blue, "What shape is the green object?" ->
triangle, "Which part of the image is the red circle in?" -> bottom left), every answer trained. Starting
from MODEL_DIR (default `runs/demo/p0/final`, the demo's LLM after language pretraining; the demo's `init`
starts from scratch), P0's recipe trains on these conversations alone in `--chunks` runs of `--epochs`
epochs each (each run's schedule starts again; with `--fresh` each chunk on conversations of its own, so none
is seen in two chunks), and after every chunk the LLM answers `--probe` held-out
first questions greedily (thinking off). `--qk-scale X` multiplies the LLM's attention logits by X before
training (its query norms' weights), `--rope-theta T` sets its RoPE base (meaningful from scratch only),
`--qk-norm-phase-in A B` phases QK-norm in during the first chunk (the trainer's `qk_norm_phase_in`: off
until A of the chunk, complete at B; default: QK-norm throughout, as when the earlier results were measured).

Prints a table and writes benchmarks/results/NAME.json (NAME: text_lookup unless --out says).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from token_oracle import Attribute, sharpen_attention  # noqa: E402

from ovis25.chat import Chat  # noqa: E402
from ovis25.eval import EvalItem, evaluate, is_hit  # noqa: E402
from ovis25.model import Ovis  # noqa: E402
from ovis25.processing import Processor  # noqa: E402
from ovis25.synth.world import place_name, scene_caption  # noqa: E402
from ovis25.train import load_recipe, train  # noqa: E402
KINDS = ("color", "shape", "place")


def conversation(rng: random.Random) -> tuple[str, list[tuple[str, str, str]]]:
    """A caption of 2-3 objects of distinct shapes and colours, and (question, answer, kind) for each object."""
    image, objs = Attribute.scene(rng)
    size = image.size
    listed, asked = objs[:], objs[:]
    rng.shuffle(listed)  # no order to lean on: the first object listed is not the one asked about
    rng.shuffle(asked)
    turns = []
    for o in asked:
        kind = rng.choice(KINDS)
        turns.append({"color": (f"What color is the {o.shape}?", o.color),
                      "shape": (f"What shape is the {o.color} object?", o.shape),
                      "place": (f"Which part of the image is the {o.name} in?", place_name(o, size))}[kind] + (kind,))
    return scene_caption(listed, size), turns


def write_dataset(out: Path, n: int, seed: int = 0) -> Path:
    """`n` conversations as the dataset `text_lookup` -> the datainfo's path."""
    rng, samples = random.Random(f"lookup-{seed}"), []
    for i in range(n):
        caption, turns = conversation(rng)
        conv = []
        for j, (question, answer, _) in enumerate(turns):
            conv += [{"from": "human", "value": f"{caption}\n{question}" if j == 0 else question},
                     {"from": "gpt", "value": answer}]
        samples.append({"id": f"lookup-{i}", "conversations": conv})
    out.mkdir(parents=True, exist_ok=True)
    (out / "lookup.json").write_text(json.dumps(samples))
    info = {"text_lookup": {"meta_file": "lookup.json", "image_dir": ".", "data_format": "conversation"}}
    (out / "datainfo.json").write_text(json.dumps(info))
    return out / "datainfo.json"


def probe_items(n: int, seed: int = 123) -> tuple[list[EvalItem], list[str]]:
    """`n` held-out first questions (caption, question) and each one's kind."""
    rng, items, kinds = random.Random(f"probe-{seed}"), [], []
    for i in range(n):
        caption, [(question, answer, kind), *_] = conversation(rng)
        items.append(EvalItem(f"lookup-{i}", "lookup", [{"from": "human", "value": f"{caption}\n{question}"}],
                              [], None, answer, "exact"))
        kinds.append(kind)
    return items, kinds


def score(model_dir: Path, items: list[EvalItem], kinds: list[str]) -> dict[str, float]:
    """Greedy accuracy per kind of question."""
    _, rows = evaluate(Chat.from_pretrained(model_dir, dtype=torch.float32), items, False, max_new_tokens=8,
                       batch_size=64, progress=False)
    hits = defaultdict(list)
    for row, kind in zip(rows, kinds):
        hits[kind].append(is_hit(row))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}


def starting_point(model_dir: Path, out: Path, qk_scale: float, rope_theta: float | None) -> Path:
    """`model_dir` as is, or a copy with its attention logits scaled and/or its RoPE base changed."""
    if qk_scale == 1 and rope_theta is None:
        return model_dir
    model = Ovis.from_pretrained(model_dir)
    sharpen_attention(model, qk_scale)
    if rope_theta is not None:
        model.config.llm_config.rope_theta = rope_theta
    generation = model_dir / "generation_config.json"
    model.save_pretrained(out, processor=Processor.from_pretrained(model_dir),
                          generation_config=json.loads(generation.read_text()) if generation.exists() else None)
    return out


def train_chunk(init: Path, out: Path, datainfo: Path, epochs: int, lr: float, overrides: list[str] = (),
                qk_norm_phase_in: list[float] | None = None) -> list[float]:
    """P0's recipe (with QK-norm phased in over `qk_norm_phase_in` of the run, or throughout) on the look-up
    conversations alone -> the losses per step (the model in out/final)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_recipe(ROOT / "recipes" / "tiny" / "p0.toml", [
        f'init="{init}"', f'out_dir="{out}"', f'datainfo="{datainfo}"', "seed=0", 'datasets=["text_lookup"]',
        f"epochs={epochs}", f"lr={lr}", *overrides])
    cfg.qk_norm_phase_in = qk_norm_phase_in
    train(cfg)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", type=Path, default=ROOT / "runs" / "demo" / "p0" / "final")
    ap.add_argument("--conversations", type=int, default=4000)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fresh", action="store_true", help="new conversations for every chunk")
    ap.add_argument("--qk-scale", type=float, default=1.0)
    ap.add_argument("--rope-theta", type=float)
    ap.add_argument("--qk-norm-phase-in", type=float, nargs=2, metavar=("A", "B"),
                    help="the first chunk phases QK-norm in: off until fraction A, complete at B (default: on)")
    ap.add_argument("--probe", type=int, default=300)
    ap.add_argument("--out", default="text_lookup")
    args = ap.parse_args()
    work = ROOT / "runs" / "text_lookup" / args.out
    items, kinds = probe_items(args.probe)
    model = starting_point(args.model_dir, work / "start", args.qk_scale, args.rope_theta)
    curve = [{"steps": 0, "mean_loss": None, **score(model, items, kinds)}]
    steps = 0
    for chunk in range(args.chunks):
        if chunk == 0 or args.fresh:  # otherwise every chunk trains on the first chunk's conversations
            datainfo = write_dataset(work / f"data{chunk}", args.conversations, seed=chunk)
        losses = train_chunk(model, work / f"chunk{chunk + 1}", datainfo, args.epochs, args.lr,
                             qk_norm_phase_in=args.qk_norm_phase_in if chunk == 0 else None)
        model, steps = work / f"chunk{chunk + 1}" / "final", steps + len(losses)
        tail = losses[-len(losses) // 4:]  # the last quarter of the chunk
        curve.append({"steps": steps, "mean_loss": round(sum(tail) / len(tail), 3), **score(model, items, kinds)})
    per_chunk = " per chunk" if args.fresh else ""
    print(f"\n{args.model_dir}, {args.conversations} conversations{per_chunk}, qk x{args.qk_scale}, rope theta "
          f"{args.rope_theta or 'as is'}, QK-norm phased in over {args.qk_norm_phase_in or 'none of the run'}; "
          f"accuracy on {args.probe} held-out first questions\n")
    print("| steps | loss (last quarter) | " + " | ".join(KINDS) + " |\n|---|---|" + "---|" * len(KINDS))
    for row in curve:
        cells = " | ".join(f"{row.get(k, 0):.2f}" for k in KINDS)
        print(f"| {row['steps']} | {row['mean_loss'] or '-'} | {cells} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"model_dir": str(args.model_dir), **{k: v for k, v in vars(args).items() if k != "model_dir"},
           "n_by_kind": {k: kinds.count(k) for k in KINDS}, "curve": curve}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {RESULTS / (args.out + '.json')}")


if __name__ == "__main__":
    main()
