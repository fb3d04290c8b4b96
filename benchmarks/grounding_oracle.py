"""Is it the visual tokens or the LLM that keeps the demo's tiny Ovis from boxing the *named* object?

    python benchmarks/grounding_oracle.py [--run runs/demo] [--variants real,oracle,...] [--steps 1500]
                                          [--batch 16] [--test 100]

Each variant trains the LLM and the VET of the demo's P1 checkpoint on fresh grounding questions about
images of two objects (`--steps` x `--batch` questions, AdamW at P2's rate and schedule), with the visual
embeddings either
- `real`: from the visual tokenizer, as in the demo (its head trains too, at P2's 2e-4);
- `oracle`: perfect: the distribution vision pretraining trains each token towards
  (`synth.regions.token_targets`: the token's region class, its column and its row, from the generator's own
  scene description) times the VET, so every token says exactly what it shows and where it is; or
- `argmax`: the visual tokenizer's own reading put in that perfect form: its most likely class and its
  column and row words (rescaled to the perfect weights), so only its mistakes differ from `oracle`;
and the answer either the box alone, as the demo's task, or (`+echo`) naming the object first:
`<ref>red square</ref><box>(x1,y1),(x2,y2)</box>`, the Ovis form of a grounded reference.

On `--test` held-out images each object is asked for in turn (greedy). Scores: mean IoU, and "picks the
named object", the share of answers whose box centre is nearer the named object than the other (0.5: the
name is ignored). Prints a table and writes benchmarks/results/grounding_oracle.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

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
from ovis25.train.trainer import lr_lambda  # noqa: E402

LR, HEAD_LR, MIN_LR_RATIO, WARMUP = 1e-3, 2e-4, 0.05, 0.03  # recipes/tiny/p2.toml
NO_THINKING = "<think>\n\n</think>\n\n"


class Grounder:
    """The model, its processor and how a question about one object of an image becomes embeddings."""

    def __init__(self, init: Path, tokens: str, echo: bool):
        self.model, self.processor = Ovis.from_pretrained(init), Processor.from_pretrained(init)
        self.tokens, self.echo = tokens, echo
        self.position_weight = VisionPretrainConfig.position_weight

    def encode(self, image, objs: list, target: int, answer: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input embeddings (1, L, H), input ids (L,), labels (L,) (all IGNORE_ID without the answer)."""
        obj = objs[target]
        turns = [{"from": "human", "value": f"<image>\nWhere is the <ref>{obj.name}</ref>?"}]
        if answer:
            box = format_box(obj.rel_box(*image.size))
            turns.append({"from": "gpt", "value": f"<ref>{obj.name}</ref>{box}" if self.echo else box})
        ids, labels, pixels, grid = self.processor.format_conversation(
            turns, images=[image], generation_preface=None if answer else NO_THINKING, **PIXELS)
        if self.tokens == "real":
            visual = self.model.visual_embeddings(pixels, grid)
        else:
            visual = self.perfect_form(image, objs, pixels, grid) @ self.model.vte.weight
        return self.model.merge_embeddings(ids[None], visual_embeds=visual), ids, labels

    def perfect_form(self, image, objs: list, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """(tokens, visual vocab): one class at 1 - 2w, column and row words at w each."""
        w, vocab = self.position_weight, self.model.config.visual_vocab_size
        if self.tokens == "oracle":
            scene = world.Sample("grounding", [image], "", "", "iou", meta={"objects": [o.to_dict() for o in objs]})
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
    def answer(self, image, objs: list, target: int, max_new_tokens: int = 48) -> str:
        """Greedy reply (no cache: the prompts are ~70 tokens)."""
        embeds, _, _ = self.encode(image, objs, target, answer=False)
        eos, out = self.processor.tokenizer.eos_token_id, []
        embed_tokens = self.model.llm.model.embed_tokens
        for _ in range(max_new_tokens):
            token = int(self.model(None, inputs_embeds=embeds, logits_to_keep=1).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]]))], 1)
        return self.processor.tokenizer.decode(out)


def two_objects(rng: random.Random):
    return world.scene(rng, rng.sample(world.KINDS, 2))


def score(grounder: Grounder, test: list) -> dict:
    grounder.model.eval()
    ious, picks = [], []
    for image, objs in test:
        boxes = [Box(*o.rel_box(*image.size)) for o in objs]
        for target in range(2):
            pred = predicted_box(grounder.answer(image, objs, target))
            ious.append(pred.iou(boxes[target]))
            picks.append(nearer_named(pred, boxes, target))
    grounder.model.train()
    return {"mean_iou": round(sum(ious) / len(ious), 3), "picks_named": round(sum(picks) / len(picks), 3)}


def train_variant(init: Path, variant: str, steps: int, batch: int, test: list, evals: int, seed: int) -> dict:
    tokens, echo = variant.split("+")[0], variant.endswith("+echo")
    torch.manual_seed(seed)
    g = Grounder(init, tokens, echo)
    model = g.model
    lrs = {"llm": LR, "vte": LR} | ({"visual_tokenizer.head": HEAD_LR} if tokens == "real" else {})
    groups = {}
    for name, p in model.named_parameters():
        prefix = next((k for k in lrs if name.startswith(k + ".")), None)
        p.requires_grad_(prefix is not None)
        if prefix:
            groups.setdefault(prefix, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lrs[k], "base_lr": lrs[k]} for k, ps in groups.items()],
                            weight_decay=0.0, betas=(0.9, 0.95))
    rng, curve, t0 = random.Random(seed), [{"step": 0, **score(g, test)}], time.perf_counter()
    for step in range(1, steps + 1):
        scale = lr_lambda(step - 1, steps, max(1, round(WARMUP * steps)), MIN_LR_RATIO)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        items = [g.encode(*two_objects(rng), target=0, answer=True) for _ in range(batch)]
        supervised = sum(int((labels != IGNORE_ID).sum()) for _, _, labels in items)
        opt.zero_grad()
        for embeds, _, labels in items:
            targets = torch.cat([labels[1:], torch.tensor([IGNORE_ID])])[None]  # next-token targets
            (model(None, inputs_embeds=embeds, targets=targets).loss / supervised).backward()
        torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], 1.0)
        opt.step()
        if step % max(1, steps // evals) == 0 or step == steps:
            point = {"step": step, "questions": step * batch, "train_s": round(time.perf_counter() - t0),
                     **score(g, test)}
            curve.append(point)
            print(variant, point, flush=True)
    return {"curve": curve, **curve[-1]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--variants", default="real,oracle,oracle+echo,real+echo,argmax+echo",
                    help="VISUAL_TOKENS[+echo], comma-separated; VISUAL_TOKENS: real, oracle or argmax")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="questions per step")
    ap.add_argument("--test", type=int, default=100, help="held-out images (each object asked: twice the answers)")
    ap.add_argument("--evals", type=int, default=3, help="scored points along each run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="grounding_oracle", help="name of the result file in benchmarks/results")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    for variant in variants:
        if variant.removesuffix("+echo") not in ("real", "oracle", "argmax"):
            ap.error(f"variant {variant!r}: the visual tokens must be real, oracle or argmax (then +echo or not)")
    init = p1_checkpoint(args.run)
    test_rng = random.Random(999)
    test = [two_objects(test_rng) for _ in range(args.test)]
    results = {"init": str(init), "steps": args.steps, "batch": args.batch, "test_images": args.test,
               "threads": torch.get_num_threads(), "variants": {}}
    for variant in variants:
        results["variants"][variant] = train_variant(init, variant, args.steps, args.batch, test, args.evals,
                                                     args.seed)
    lines = [f"\ntwo-object grounding, {args.steps * args.batch} questions, from {init}:",
             "| visual tokens + answer | mean IoU | picks the named object | train s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['mean_iou']:.3f} | {v['picks_named']:.2f} | {v['train_s']} |"
              for k, v in results["variants"].items()]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / args.out}.json")


if __name__ == "__main__":
    main()
