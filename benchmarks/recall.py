"""How fast does the demo's LLM learn associative recall, with nothing else to learn?

    python benchmarks/recall.py [--pairs 3] [--queries Q] [--gap G] [--direct-share F]
                                [--value-first | --joint | --conjunction [--background B]
                                 [--visual keys|values|both [--visual-from-text start|tied]]]
                                [--steps 3000] [--batch 64] [--lr 3e-3] [--every 250]
                                [--qk-norm-lr-mult M | --qk-norm-phase-in A B | --no-qk-norm]
                                [--set hidden_size=256 ...] [--seed 0] [--out NAME] [--init DIR --save DIR]

The demo's look-up failures (text_lookup.py: "the colour of the named shape" from a caption) reduce to this: a
sequence of `--pairs` key-value token pairs, then every key again in random order (or only `--queries` of
them), each followed by its value, trained to predict the value at each repeated key (multi-query associative
recall; keys and values are tokens of their own, 100 of each). The LLM is the demo's
(`synth.model.tiny_config`: a 4 x 128 Qwen3, 4 heads / 2 kv) unless `--set` changes a Qwen3Config field,
initialised as the demo initialises it, trained with P0's optimiser settings (AdamW, LR warmup 5% then cosine
to a tenth, gradient clip 1). Every `--every` steps it is scored on 1024 held-out sequences, over all queries
and by the order they are asked in: answering with one of the sequence's own values at random scores 1 / pairs,
and with one not yet asked about (no look-up, only elimination) 1 / pairs for the first query, 1 / (pairs - 1)
for the second, ..., 1 for the last. Two steps towards text: `--gap G` puts G fixed filler tokens between each
repeated key and its value (the value is due at the last), as a chat template's end of turn and start of the
answer stand between the named object and the answer; `--value-first` writes every pair value before key, as
a caption puts the colour before the shape it names. `--direct-share F` gives a share F of the training
batches the easiest form, no gap and no background (below; the held-out sequences keep both), so the look-up
can be learned where it is easy.
`--joint` gives each pair a single position, the mean of the key's and the value's embeddings, as a visual
token holds what it shows and where (grounding's look-up: match the named object, read its place).
`--conjunction` makes each key two tokens at that position, a "colour" and a "shape" shared with other keys
(two colours and two shapes make every key of a sequence), and the query names both, as "the red triangle"
among a red square and a blue triangle. `--background B` mixes B positions among the pairs, each a background
token with a value of its own, as the empty parts of an image hold their places.
`--visual keys|values|both` (with --conjunction) writes the pairs in tokens of their own, as a visual token holds
visual words, not the question's text: each key as one class token per (colour, shape), each value as a place
token, or both; queries and answers stay in the text tokens. `--visual-from-text start|tied` makes each class
embedding the mean of its colour's and shape's and each place embedding its value's, at the start only or
throughout (the table's own rows then a learned difference), as a VET whose visual words are tied to their names.
`--qk-norm-lr-mult M` trains the query/key-norm gains (Qwen3's QK-norm, which fixes every query's and key's
length) at M times the LR; `--qk-norm-phase-in A B` trains with QK-norm phased in (the trainer's
`qk_norm_phase_in`: queries and keys keep their lengths until A of the run, then blend linearly into the
normalised form, complete at B, so the model ends as plain Qwen3); `--no-qk-norm` removes QK-norm altogether, an
ablation no Qwen3 checkpoint can hold.
`--init DIR` trains the LLM of an Ovis checkpoint instead (the demo's `runs/demo/init`, or a later phase; keys and
values are then token ids 10-209 of its tokenizer), and `--save DIR` writes the whole checkpoint with the trained
LLM, so the look-up it learned can be carried into text (`text_lookup.py DIR`) or the curriculum.
The reference-parity tests (tests/test_build.py) show our Qwen3 trains exactly as transformers' does (same
loss and gradients, packed or not), so what this measures is the architecture at this size, not the code: as
is, the LLM answers by elimination for 16000 steps; without QK-norm it learns the look-up in 2000-3000, and with
QK-norm phased in over 0.4-0.75 of 4000 steps as well, ending as Qwen3 (DEMO.md).

Prints a table and writes benchmarks/results/NAME.json (NAME: recall unless --out says).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ovis25.model import Ovis
from ovis25.model.llm import Qwen3ForCausalLM
from ovis25.processing import Processor
from ovis25.synth.model import init_weights, tiny_config
from ovis25.train.phases import QKNormPhaseIn
from ovis25.train.trainer import lr_lambda, qk_norm_blend

RESULTS = Path(__file__).resolve().parent / "results"
KEYS, VALUES = range(10, 110), range(110, 210)  # token ids; the rest of the vocabulary is never used
COLOUR_KEYS, SHAPE_KEYS = range(10, 20), range(20, 30)  # the two halves of a key with --conjunction
# --visual: the pairs hold tokens of their own, as a visual token holds visual words, not text: a class per
# (colour, shape) and a place per value, the value's text token still the answer
PLACES, CLASSES = range(210, 310), range(310, 410)
VISUAL_VOCAB = CLASSES.stop  # the vocabulary --visual needs (the others' is VALUES.stop, as before)
BACKGROUND = 0
SEPARATOR = 1
FILLERS = range(2, 10)  # a fixed run of tokens between a query and its answer, as a chat template's turn end


def sequences(n: int, rng: random.Random, pairs: int, queries: int | None = None, gap: int = 0,
              value_first: bool = False, joint: bool = False, conjunction: bool = False,
              background: int = 0, visual: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2 * pairs + 1 + (gap + 2) * queries) token ids and targets (-100 except where the value is due: at
    the repeated key, or at the last of the `gap` filler tokens after it); `queries` distinct keys are asked
    (default: all). `value_first` writes each pair value before key, as a caption puts a colour before its
    shape. `joint` gives each pair one position whose embedding is the mean of the key's and the value's, as
    a visual token mixes the visual words of what it shows: ids are then (n, pairs + 1 + (gap + 2) * queries, 2),
    the two tokens averaged at each position (the same one twice outside the pairs). `conjunction` (joint, at
    most 4 pairs) makes each key two tokens, a "colour" and a "shape", drawn from two of each so that every key
    shares one of them with another: ids (n, pairs + 1 + (gap + 3) * queries, 3), a query naming both.
    `background` (joint or conjunction) mixes that many positions among the pairs that hold a background token
    with a value of their own, as a visual token of empty image holds its place (the ids `background` longer).
    `visual` (conjunction: "keys", "values" or "both") writes each pair's key as its class token (twice), its
    value as the value's place token, or both, so that the query's colour and shape, or the answer's value, are
    other tokens than those the pair holds."""
    joint = joint or conjunction
    ids, targets = [], []
    for _ in range(n):
        if conjunction:
            colours, shapes = rng.sample(COLOUR_KEYS, 2), rng.sample(SHAPE_KEYS, 2)
            keys = rng.sample([(c, s) for c in colours for s in shapes], pairs)
        else:
            keys = [(k,) for k in rng.sample(KEYS, pairs)]
        values = [rng.choice(VALUES) for _ in keys]
        width = len(keys[0]) + 1
        if joint:
            value_tokens = PLACES if visual in ("values", "both") else VALUES
            seq = [((class_of(k),) * 2 if visual in ("keys", "both") else k) + (value_tokens[v - VALUES.start],)
                   for k, v in zip(keys, values)]
            if background:
                seq += [(BACKGROUND,) * len(keys[0]) + (rng.choice(value_tokens),) for _ in range(background)]
                rng.shuffle(seq)
        else:
            seq = [(t, t) for (k,), v in zip(keys, values) for t in ((v, k) if value_first else (k, v))]
        seq.append((SEPARATOR,) * width)
        target = [-100] * len(seq)
        for i in rng.sample(range(pairs), queries or pairs):
            seq += [(t,) * width for t in (*keys[i], *FILLERS[:gap], values[i])]
            target += [-100] * (len(keys[i]) - 1 + gap) + [values[i], -100]
        ids.append(seq)
        targets.append(target)
    ids = torch.tensor(ids)
    return (ids if joint else ids[..., 0]), torch.tensor(targets)


def class_of(key: tuple[int, int]) -> int:
    """The class token of a (colour, shape) key with --visual."""
    return CLASSES[(key[0] - COLOUR_KEYS.start) * len(SHAPE_KEYS) + key[1] - SHAPE_KEYS.start]


def start_visual_from_text(embeddings: torch.Tensor) -> None:
    """--visual-from-text start: each class token starts as the mean of its colour's and shape's embeddings, each
    place token as its value's (they then train apart)."""
    tie = VisualFromText()
    with torch.no_grad():
        embeddings.copy_(tie(tie.right_inverse(embeddings)))


class VisualFromText(torch.nn.Module):
    """--visual-from-text tied: the class and place rows of the embedding table are their text tokens' (the mean
    of the colour's and the shape's, the value's) plus the table's own rows as a learned difference (zero at the
    start)."""

    def __init__(self):
        super().__init__()
        colours, shapes = zip(*[(c, s) for c in COLOUR_KEYS for s in SHAPE_KEYS])
        self.register_buffer("classes", torch.tensor([class_of(k) for k in zip(colours, shapes)]))
        self.register_buffer("names", torch.tensor([colours, shapes]).T)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        text = torch.zeros_like(weight)
        text[self.classes] = weight[self.names].mean(1)
        text[PLACES.start:PLACES.stop] = weight[VALUES.start:VALUES.stop]
        return weight + text

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:  # the differences start at zero
        out = weight.clone()
        out[self.classes] = 0
        out[PLACES.start:PLACES.stop] = 0
        return out


def model_for(overrides: dict[str, int | float], seed: int, vocab: int = VALUES.stop) -> Qwen3ForCausalLM:
    config = dataclasses.replace(tiny_config(vocab).llm_config, **overrides)
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        config.intermediate_size = 4 * config.hidden_size
    model = Qwen3ForCausalLM(config)
    init_weights(model, seed=seed)
    return model


def logits_of(model: Qwen3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """ids (n, L), or (n, L, k) with k tokens averaged at each position."""
    embeds = model.model.embed_tokens(ids)
    if ids.dim() == 3:
        embeds = embeds.mean(2)
    positions = torch.arange(ids.shape[1]).expand(ids.shape[:2])
    return model.lm_head(model(embeds, positions))


def accuracy(model: Qwen3ForCausalLM, ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float]]:
    """Held-out accuracy over all queries, and by query order (first key asked, second, ...)."""
    with torch.no_grad():
        predicted = logits_of(model, ids).argmax(-1)
    asked = targets != -100
    right = (predicted[asked] == targets[asked]).float().view(len(ids), -1)  # (n, pairs), in the order asked
    return right.mean().item(), right.mean(0).tolist()


def drop_qk_norm(model: Qwen3ForCausalLM) -> None:
    for layer in model.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()


def is_qk_norm(name: str) -> bool:
    return name.endswith(("q_norm.weight", "k_norm.weight"))


Task = Callable[[int, random.Random], tuple[torch.Tensor, torch.Tensor]]  # (n, rng) -> ids, targets


def mixture(task: Task, easy: Task, share: float) -> Task:
    """`easy` for a share of the batches, `task` for the rest (each batch drawn with its own rng)."""
    return lambda n, rng: (easy if rng.random() < share else task)(n, rng)


def train(model: Qwen3ForCausalLM, task: Task, steps: int, batch: int, lr: float, every: int, seed: int,
          qk_norm_lr_mult: float = 1.0, qk_norm_phase_in: tuple[float, float] | None = None,
          held_out: Task | None = None) -> list[dict]:
    """Trains on fresh batches of `task` (e.g. `partial(sequences, pairs=3)`), scoring 1024 held-out sequences
    of `held_out` (default: the same task)."""
    rng = random.Random(seed)
    held_out = (held_out or task)(1024, random.Random(seed + 10_000))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if is_qk_norm(n) == qk], "lr": lr * mult}
              for qk, mult in ((False, 1.0), (True, qk_norm_lr_mult))]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    schedule = partial(lr_lambda, total=steps, warmup=max(1, round(0.05 * steps)), min_ratio=0.1)  # P0's
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve, losses, start = [], [], time.perf_counter()
    phase_in = QKNormPhaseIn(model) if qk_norm_phase_in else None  # as the trainer's qk_norm_phase_in does
    for step in range(1, steps + 1):
        if phase_in is not None:
            phase_in.blend = qk_norm_blend(step - 1, steps, *qk_norm_phase_in)
        ids, targets = task(batch, rng)
        loss = F.cross_entropy(logits_of(model, ids).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            overall, by_query = accuracy(model, *held_out)
            row = {"steps": step, "loss": round(sum(losses) / len(losses), 4), "accuracy": round(overall, 4),
                   "by_query": [round(a, 3) for a in by_query], "seconds": round(time.perf_counter() - start),
                   "qk_norm_blend": None if phase_in is None else phase_in.blend}
            curve.append(row)
            losses = []
            print(f"| {row['steps']} | {row['loss']} | {row['accuracy']} | "
                  + " | ".join(map(str, row["by_query"])) + f" | {row['seconds']} |", flush=True)
    if phase_in is not None:  # the model goes back as plain Qwen3
        phase_in.remove()
    return curve


def parse_set(items: list[str]) -> dict[str, int | float]:
    fields = {f.name for f in dataclasses.fields(tiny_config(VALUES.stop).llm_config)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=NUMBER with FIELD a Qwen3Config field")
        out[name] = float(value) if "." in value or "e" in value else int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--queries", type=int, help="keys asked per sequence (default: all)")
    parser.add_argument("--gap", type=int, default=0, help=f"filler tokens between a query and its answer "
                                                           f"(at most {len(FILLERS)})")
    parser.add_argument("--value-first", action="store_true", help="pairs written value before key")
    parser.add_argument("--joint", action="store_true", help="each pair one position: key and value averaged")
    parser.add_argument("--conjunction", action="store_true",
                        help="keys of two tokens, each shared with another key; joint positions")
    parser.add_argument("--visual", choices=["keys", "values", "both"],
                        help="with --conjunction: the pairs' keys as class tokens, their values as place tokens, "
                             "or both, asked and answered in the colour/shape and value tokens")
    parser.add_argument("--visual-from-text", choices=["start", "tied"],
                        help="with --visual: each class embedding the mean of its colour's and shape's, each place "
                             "embedding its value's, at the start only or throughout (plus a learned difference)")
    parser.add_argument("--background", type=int, default=0,
                        help="positions of background, each with a value, among the pairs (--joint, --conjunction)")
    parser.add_argument("--direct-share", type=float, default=0.0,
                        help="share of the training batches with no gap and no background (held-out ones keep them)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    qk_norm = parser.add_mutually_exclusive_group()
    qk_norm.add_argument("--qk-norm-lr-mult", type=float, default=1.0, help="LR multiplier for the QK-norm gains")
    qk_norm.add_argument("--qk-norm-phase-in", type=float, nargs=2, metavar=("A", "B"),
                         help="QK-norm off until fraction A of the run, blended in linearly, complete at B")
    qk_norm.add_argument("--no-qk-norm", action="store_true", help="ablation: attention without QK-norm")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--set", nargs="*", default=[], help="Qwen3Config overrides, e.g. hidden_size=256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="recall")
    parser.add_argument("--init", type=Path, help="train the LLM of this Ovis checkpoint")
    parser.add_argument("--save", type=Path, help="write the checkpoint with the trained LLM here (needs --init)")
    args = parser.parse_args()
    if not 1 <= (args.queries or args.pairs) <= args.pairs:
        raise SystemExit(f"--queries {args.queries}: must be between 1 and --pairs ({args.pairs})")
    if not 0 <= args.gap <= len(FILLERS):
        raise SystemExit(f"--gap {args.gap}: must be between 0 and {len(FILLERS)}")
    if (args.joint or args.conjunction) and args.value_first:
        raise SystemExit("--joint and --conjunction put key and value at one position: --value-first does not apply")
    if args.background and not (args.joint or args.conjunction):
        raise SystemExit("--background needs --joint or --conjunction: it mixes positions among the pairs")
    if args.visual_from_text and not args.visual:
        raise SystemExit("--visual-from-text needs --visual")
    if args.visual and not args.conjunction:
        raise SystemExit("--visual needs --conjunction: it replaces a two-token key by its class")
    if args.conjunction and args.pairs > 4:
        raise SystemExit(f"--conjunction --pairs {args.pairs}: at most 4 keys of two colours and two shapes")
    if not 0 <= args.direct_share < 1:
        raise SystemExit(f"--direct-share {args.direct_share}: must be in [0, 1)")
    if args.save and not args.init:
        raise SystemExit("--save needs --init: only an Ovis checkpoint can be saved")
    if args.init and (args.set or args.no_qk_norm):
        raise SystemExit("--init trains the checkpoint's LLM as it is: --set and --no-qk-norm do not apply")
    torch.manual_seed(args.seed)
    overrides = parse_set(args.set)
    ovis = Ovis.from_pretrained(args.init) if args.init else None
    vocab = VISUAL_VOCAB if args.visual else VALUES.stop
    if ovis is not None and ovis.llm.config.vocab_size < vocab:
        raise SystemExit(f"--init {args.init}: vocabulary of {ovis.llm.config.vocab_size} tokens, "
                         f"recall needs ids up to {vocab - 1}")
    model = ovis.llm if ovis is not None else model_for(overrides, args.seed, vocab)
    if args.no_qk_norm:
        drop_qk_norm(model)
    if args.visual_from_text == "start":
        start_visual_from_text(model.model.embed_tokens.weight)
    elif args.visual_from_text == "tied":
        parametrize.register_parametrization(model.model.embed_tokens, "weight", VisualFromText())
    n_params = sum(p.numel() for p in model.parameters())
    qk = ("no QK-norm" if args.no_qk_norm else "QK-norm phased in over {:g}-{:g} of the run".format(
        *args.qk_norm_phase_in) if args.qk_norm_phase_in else f"QK-norm gains at {args.qk_norm_lr_mult:g} x LR")
    print(f"{args.pairs} pairs, batch {args.batch}, LR {args.lr} ({qk}), LLM overrides {overrides or 'none'} "
          f"({n_params / 1e6:.2f}M parameters); guessing among the values: {1 / args.pairs:.2f}\n")
    asked = args.queries or args.pairs
    queries = " | ".join(f"query {i + 1} (elimination {1 / (args.pairs - i):.2f})" for i in range(asked))
    print(f"| steps | loss | held-out accuracy | {queries} | seconds |\n|---|---|---|" + "---|" * (asked + 1))
    task = partial(sequences, pairs=args.pairs, queries=args.queries, gap=args.gap, value_first=args.value_first,
                   joint=args.joint, conjunction=args.conjunction, background=args.background, visual=args.visual or "")
    easy = partial(task, gap=0, background=0)
    training = mixture(task, easy, args.direct_share) if args.direct_share else task
    curve = train(model, training, args.steps, args.batch, args.lr, args.every, args.seed, args.qk_norm_lr_mult,
                  args.qk_norm_phase_in, held_out=task)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"config": vars(args) | {"overrides": overrides, "parameters": n_params}, "curve": curve}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {RESULTS / (args.out + '.json')}")
    if args.save:
        generation = args.init / "generation_config.json"
        ovis.save_pretrained(args.save, processor=Processor.from_pretrained(args.init),
                             generation_config=json.loads(generation.read_text()) if generation.exists() else None)
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
