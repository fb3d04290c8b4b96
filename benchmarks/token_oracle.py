"""Is it the visual tokens or the LLM that holds the demo's tiny Ovis back on a task?

    python benchmarks/token_oracle.py [--task grounding|count|attribute] [--run runs/demo] [--variants real,oracle,...]
                                      [--steps 1500] [--batch 16] [--test 100] [--qk-scale 1] [--head-scale 1]

Each variant trains the LLM and the VET of the demo's P1 checkpoint on fresh questions of one task
(`--steps` x `--batch` questions, AdamW at P2's rate and schedule), with the visual embeddings either
- `real`: from the visual tokenizer, as in the demo (its head trains too, at P2's 2e-4);
- `oracle`: perfect: the distribution vision pretraining trains each token towards
  (`synth.regions.token_targets`: the token's region class, its column and its row, from the generator's own
  scene description) times the VET, so every token says exactly what it shows and where it is; or
- `argmax`: the visual tokenizer's own reading put in that perfect form: its most likely class and its
  column and row words (rescaled to the perfect weights), so only its mistakes differ from `oracle`.

Tasks:
- `grounding`: images of two objects, the answer a box, or (`+echo`) naming the object first:
  `<ref>red square</ref><box>(x1,y1),(x2,y2)</box>`, the Ovis form of a grounded reference. On `--test`
  held-out images each object is asked for in turn (greedy). Scores: mean IoU, and "picks the named
  object", the share of answers whose box centre is nearer the named object than the other (0.5: the name
  is ignored).
- `attribute`: the demo's attribute questions on scenes of two or three objects, each object asked about in
  turn on the test. Scores: accuracy asking a colour (of a named shape) and a shape (of a named colour), and
  the share of scenes given one answer whatever object was named.
- `count`: the demo's counting questions (1-5 objects of one shape and colour, up to two distractors).
  Scores: accuracy on `--test` held-out questions, and accuracy by the true count.

`--qk-scale X` multiplies every LLM attention logit by X from the start (sharper attention), `--head-scale X`
every visual token logit (sharper visual tokens).

Prints a table and writes benchmarks/results/OUT.json (OUT: TASK_oracle unless --out says otherwise).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from demo_curves import PIXELS, p1_checkpoint  # noqa: E402
from grounding_selection import nearer_named, predicted_box  # noqa: E402

from ovis25.constants import IGNORE_ID  # noqa: E402
from ovis25.grounding import Box, format_box  # noqa: E402
from ovis25.model import Ovis  # noqa: E402
from ovis25.processing import Processor  # noqa: E402
from ovis25.synth import world  # noqa: E402
from ovis25.synth.pretrain import VisionPretrainConfig  # noqa: E402
from ovis25.synth.regions import CLASSES, COLUMN_WORDS, ROW_WORDS, token_labels, token_targets  # noqa: E402
from ovis25.train.phases import sharpen_visual_tokens  # noqa: E402
from ovis25.train.trainer import lr_lambda  # noqa: E402

LR, HEAD_LR, MIN_LR_RATIO, WARMUP = 1e-3, 2e-4, 0.05, 0.03  # recipes/tiny/p2.toml
NO_THINKING = "<think>\n\n</think>\n\n"


@dataclass
class Item:
    """One question about an image: its objects (for the perfect tokens), the question and the answer."""
    image: Image.Image
    objs: list[world.Obj]
    question: str
    answer: str
    target: int = 0  # grounding: the object asked for


class Grounding:
    """Two objects per image; training asks for the first (placed at random), the test for each in turn."""
    name, max_new_tokens = "grounding", 48

    def __init__(self, echo: bool):
        self.echo = echo

    def item(self, image, objs: list, target: int) -> Item:
        obj = objs[target]
        box = format_box(obj.rel_box(*image.size))
        answer = f"<ref>{obj.name}</ref>{box}" if self.echo else box
        return Item(image, objs, f"Where is the <ref>{obj.name}</ref>?", answer, target)

    def draw(self, rng: random.Random) -> Item:
        return self.item(*world.scene(rng, rng.sample(world.KINDS, 2)), target=0)

    def test_items(self, rng: random.Random, n: int) -> list[Item]:
        scenes = [world.scene(rng, rng.sample(world.KINDS, 2)) for _ in range(n)]
        return [self.item(image, objs, target) for image, objs in scenes for target in range(2)]

    def score(self, items: list[Item], replies: list[str]) -> dict:
        ious, picks = [], []
        for item, reply in zip(items, replies):
            boxes = [Box(*o.rel_box(*item.image.size)) for o in item.objs]
            pred = predicted_box(reply)
            ious.append(pred.iou(boxes[item.target]))
            picks.append(nearer_named(pred, boxes, item.target))
        return {"mean_iou": round(sum(ious) / len(ious), 3), "picks_named": round(sum(picks) / len(picks), 3)}


class Count:
    """The demo's counting questions, answered with the number."""
    name, max_new_tokens = "count", 6

    def __init__(self, echo: bool):
        if echo:
            raise ValueError("count has no +echo form")

    def draw(self, rng: random.Random) -> Item:
        sample = world.count(rng)
        objs = [world.Obj.from_dict(o) for o in sample.meta["objects"]]
        return Item(sample.images[0], objs, sample.question, sample.answer)

    def test_items(self, rng: random.Random, n: int) -> list[Item]:
        return [self.draw(rng) for _ in range(n)]

    def score(self, items: list[Item], replies: list[str]) -> dict:
        right: dict[str, list[bool]] = {}
        for item, reply in zip(items, replies):
            right.setdefault(item.answer, []).append(reply.strip() == item.answer)
        by_count = {n: round(sum(r) / len(r), 3) for n, r in sorted(right.items())}
        return {"accuracy": round(sum(map(sum, right.values())) / len(items), 3), "by_count": by_count}


class Attribute:
    """The demo's attribute questions on scenes of two or three objects (distinct shapes, distinct colours):
    "What color is the <shape>?" or "What shape is the <colour> object?"; the test asks about each object in
    turn, so a model that ignores the name cannot score above 1/objects."""
    name, max_new_tokens = "attribute", 4

    def __init__(self, echo: bool):
        if echo:
            raise ValueError("attribute has no +echo form")

    @staticmethod
    def ask(image, objs: list, target: int, asked: str) -> Item:
        obj = objs[target]
        if asked == "color":
            return Item(image, objs, f"What color is the {obj.shape}?", obj.color, target)
        return Item(image, objs, f"What shape is the {obj.color} object?", obj.shape, target)

    @staticmethod
    def scene(rng: random.Random) -> tuple:
        k = rng.randint(2, 3)
        return world.scene(rng, list(zip(rng.sample(world.SHAPES, k), rng.sample(list(world.COLORS), k))))

    def draw(self, rng: random.Random) -> Item:
        return self.ask(*self.scene(rng), target=0, asked=rng.choice(("color", "shape")))

    def test_items(self, rng: random.Random, n: int) -> list[Item]:
        items = []
        for i in range(n):
            image, objs = self.scene(rng)
            items += [self.ask(image, objs, t, ("color", "shape")[i % 2]) for t in range(len(objs))]
        return items

    def score(self, items: list[Item], replies: list[str]) -> dict:
        """Accuracy per kind asked, and the share of scenes where every object got the same answer."""
        right: dict[str, list[bool]] = {"color": [], "shape": []}
        scenes: dict[int, tuple[str, list[str]]] = {}
        for item, reply in zip(items, replies):
            asked = "color" if item.question.startswith("What color") else "shape"
            right[asked].append(reply.strip() == item.answer)
            scenes.setdefault(id(item.image), (asked, []))[1].append(reply.strip())
        same = {k: [len(set(r)) == 1 for a, r in scenes.values() if a == k] for k in right}
        return {**{f"{k}_accuracy": round(sum(v) / len(v), 3) for k, v in right.items()},
                **{f"{k}_same_answer": round(sum(v) / len(v), 3) for k, v in same.items()}}


TASKS = {"grounding": Grounding, "count": Count, "attribute": Attribute}


@torch.no_grad()
def sharpen_attention(model: Ovis, factor: float) -> None:
    """Every LLM attention logit times `factor`: each layer's query-norm weight scaled (QK-norm caps the
    logits at about sqrt(head_dim) otherwise)."""
    for layer in model.llm.model.layers:
        layer.self_attn.q_norm.weight.mul_(factor)


class Oracle:
    """The model, its processor and how a question becomes embeddings with the variant's visual tokens."""

    def __init__(self, init: Path, tokens: str, qk_scale: float = 1.0, head_scale: float = 1.0):
        self.model, self.processor = Ovis.from_pretrained(init), Processor.from_pretrained(init)
        sharpen_attention(self.model, qk_scale)
        sharpen_visual_tokens(self.model, head_scale)
        self.tokens = tokens
        self.position_weight = VisionPretrainConfig.position_weight

    def encode(self, item: Item, answer: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input embeddings (1, L, H), input ids (L,), labels (L,) (all IGNORE_ID without the answer)."""
        turns = [{"from": "human", "value": f"<image>\n{item.question}"}]
        if answer:
            turns.append({"from": "gpt", "value": item.answer})
        ids, labels, pixels, grid = self.processor.format_conversation(
            turns, images=[item.image], generation_preface=None if answer else NO_THINKING, **PIXELS)
        if self.tokens == "real":
            visual = self.model.visual_embeddings(pixels, grid)
        else:
            visual = self.perfect_form(item, pixels, grid) @ self.model.vte.weight
        return self.model.merge_embeddings(ids[None], visual_embeds=visual), ids, labels

    def perfect_form(self, item: Item, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """(tokens, visual vocab): one class at 1 - 2w, column and row words at w each."""
        w, vocab = self.position_weight, self.model.config.visual_vocab_size
        if self.tokens == "oracle":
            scene = world.Sample("oracle", [item.image], "", "", "exact",
                                 meta={"objects": [o.to_dict() for o in item.objs]})
            regions = token_labels(scene, PIXELS["min_pixels"], PIXELS["max_pixels"], self.processor.patch_size,
                                   self.processor.hidden_stride)
            return token_targets(regions, grid, vocab, w)
        with torch.no_grad():
            read = self.model.visual_tokenizer(pixels, grid)
        probs = torch.zeros_like(read)
        probs[torch.arange(len(read)), read[:, :len(CLASSES)].argmax(-1)] = 1 - 2 * w
        for words in (COLUMN_WORDS, ROW_WORDS):
            probs[:, words] = w * read[:, words] / read[:, words].sum(-1, keepdim=True)
        return probs

    @torch.no_grad()
    def answer(self, item: Item, max_new_tokens: int) -> str:
        """Greedy reply (no cache: the prompts are ~70 tokens)."""
        embeds, _, _ = self.encode(item, answer=False)
        eos, out = self.processor.tokenizer.eos_token_id, []
        embed_tokens = self.model.llm.model.embed_tokens
        for _ in range(max_new_tokens):
            token = int(self.model(None, inputs_embeds=embeds, logits_to_keep=1).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]]))], 1)
        return self.processor.tokenizer.decode(out)


def score(oracle: Oracle, task, test: list[Item]) -> dict:
    oracle.model.eval()
    scores = task.score(test, [oracle.answer(item, task.max_new_tokens) for item in test])
    oracle.model.train()
    return scores


def train_variant(init: Path, task_name: str, variant: str, steps: int, batch: int, test_n: int, evals: int,
                  seed: int, qk_scale: float = 1.0, head_scale: float = 1.0) -> dict:
    tokens = variant.split("+")[0]
    task = TASKS[task_name](echo=variant.endswith("+echo"))
    test = task.test_items(random.Random(999), test_n)
    torch.manual_seed(seed)
    oracle = Oracle(init, tokens, qk_scale, head_scale)
    model = oracle.model
    lrs = {"llm": LR, "vte": LR} | ({"visual_tokenizer.head": HEAD_LR} if tokens == "real" else {})
    groups = {}
    for name, p in model.named_parameters():
        prefix = next((k for k in lrs if name.startswith(k + ".")), None)
        p.requires_grad_(prefix is not None)
        if prefix:
            groups.setdefault(prefix, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lrs[k], "base_lr": lrs[k]} for k, ps in groups.items()],
                            weight_decay=0.0, betas=(0.9, 0.95))
    rng, curve, t0 = random.Random(seed), [{"step": 0, **score(oracle, task, test)}], time.perf_counter()
    eval_steps = {round(k * steps / evals) for k in range(1, evals + 1)}
    for step in range(1, steps + 1):
        scale = lr_lambda(step - 1, steps, max(1, round(WARMUP * steps)), MIN_LR_RATIO)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        items = [oracle.encode(task.draw(rng), answer=True) for _ in range(batch)]
        supervised = sum(int((labels != IGNORE_ID).sum()) for _, _, labels in items)
        opt.zero_grad()
        for embeds, _, labels in items:
            targets = torch.cat([labels[1:], torch.tensor([IGNORE_ID])])[None]  # next-token targets
            (model(None, inputs_embeds=embeds, targets=targets).loss / supervised).backward()
        torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], 1.0)
        opt.step()
        if step in eval_steps:
            point = {"step": step, "questions": step * batch, "train_s": round(time.perf_counter() - t0),
                     **score(oracle, task, test)}
            curve.append(point)
            print(variant, point, flush=True)
    return {"curve": curve, **curve[-1]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="grounding")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--variants", default=None,
                    help="VISUAL_TOKENS[+echo], comma-separated; VISUAL_TOKENS: real, oracle or argmax; +echo: "
                         "grounding only (default: real,oracle,oracle+echo,real+echo,argmax+echo for grounding, "
                         "real,oracle,argmax for count and attribute)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="questions per step")
    ap.add_argument("--test", type=int, default=100,
                    help="held-out images (grounding: each object asked, twice the answers)")
    ap.add_argument("--evals", type=int, default=3, help="scored points along each run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qk-scale", type=float, default=1.0,
                    help="multiply the LLM's query-norm weights, so every attention logit, by this at the start")
    ap.add_argument("--head-scale", type=float, default=1.0,
                    help="multiply the visual head's LayerNorm (weight and bias), so every visual token logit, by "
                         "this: sharper visual tokens (`real`, `argmax`)")
    ap.add_argument("--out", default=None, help="name of the result file in benchmarks/results (TASK_oracle)")
    args = ap.parse_args(argv)
    default = "real,oracle,oracle+echo,real+echo,argmax+echo" if args.task == "grounding" else "real,oracle,argmax"
    variants = (args.variants or default).split(",")
    for variant in variants:
        if variant.removesuffix("+echo") not in ("real", "oracle", "argmax"):
            ap.error(f"variant {variant!r}: the visual tokens must be real, oracle or argmax (then +echo or not)")
        if variant.endswith("+echo") and args.task != "grounding":
            ap.error(f"variant {variant!r}: +echo is a grounding answer form; --task {args.task} has none")
    init = p1_checkpoint(args.run)
    out = args.out or f"{args.task}_oracle"
    results = {"task": args.task, "init": str(init), "steps": args.steps, "batch": args.batch,
               "test": args.test, "qk_scale": args.qk_scale, "head_scale": args.head_scale,
               "threads": torch.get_num_threads(), "variants": {}}
    for variant in variants:
        results["variants"][variant] = train_variant(init, args.task, variant, args.steps, args.batch, args.test,
                                                     args.evals, args.seed, args.qk_scale, args.head_scale)
    metrics = [k for k in results["variants"][variants[0]] if k not in ("curve", "step", "questions", "train_s")]
    lines = [f"\n{args.task}, {args.steps * args.batch} questions, from {init}:",
             f"| visual tokens | {' | '.join(metrics)} | train s |", "|---" * (len(metrics) + 2) + "|"]
    lines += [f"| {k} | {' | '.join(str(v[m]) for m in metrics)} | {v['train_s']} |"
              for k, v in results["variants"].items()]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / out}.json")


if __name__ == "__main__":
    main()
