"""How fast does the demo's LLM learn associative recall, with nothing else to learn?

    python benchmarks/recall.py [--pairs 3] [--queries Q] [--steps 3000] [--batch 64] [--lr 3e-3]
                                [--qk-norm-lr-mult M | --qk-norm-phase-in A B | --no-qk-norm] [--every 250]
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
for the second, ..., 1 for the last.
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
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ovis25.model import Ovis
from ovis25.model.llm import Qwen3ForCausalLM
from ovis25.processing import Processor
from ovis25.synth.model import init_weights, tiny_config
from ovis25.train.phases import QKNormPhaseIn
from ovis25.train.trainer import lr_lambda, qk_norm_blend

RESULTS = Path(__file__).resolve().parent / "results"
KEYS, VALUES = range(10, 110), range(110, 210)  # token ids; the rest of the vocabulary is never used
SEPARATOR = 1


def sequences(n: int, pairs: int, rng: random.Random,
              queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2 * (pairs + queries) + 1) token ids and targets (-100 except at the repeated keys, where it is the
    value); `queries` distinct keys are asked (default: all)."""
    ids, targets = [], []
    for _ in range(n):
        keys = rng.sample(KEYS, pairs)
        values = [rng.choice(VALUES) for _ in keys]
        seq = [t for kv in zip(keys, values) for t in kv] + [SEPARATOR]
        target = [-100] * len(seq)
        for i in rng.sample(range(pairs), queries or pairs):
            seq += [keys[i], values[i]]
            target += [values[i], -100]
        ids.append(seq)
        targets.append(target)
    return torch.tensor(ids), torch.tensor(targets)


def model_for(overrides: dict[str, int | float], seed: int) -> Qwen3ForCausalLM:
    config = dataclasses.replace(tiny_config(VALUES.stop).llm_config, **overrides)
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        config.intermediate_size = 4 * config.hidden_size
    model = Qwen3ForCausalLM(config)
    init_weights(model, seed=seed)
    return model


def logits_of(model: Qwen3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model.lm_head(model(model.model.embed_tokens(ids), positions))


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


def train(model: Qwen3ForCausalLM, pairs: int, steps: int, batch: int, lr: float, every: int, seed: int,
          queries: int | None = None, qk_norm_lr_mult: float = 1.0,
          qk_norm_phase_in: tuple[float, float] | None = None) -> list[dict]:
    rng = random.Random(seed)
    held_out = sequences(1024, pairs, random.Random(seed + 10_000), queries)
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
        ids, targets = sequences(batch, pairs, rng, queries)
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
    if args.save and not args.init:
        raise SystemExit("--save needs --init: only an Ovis checkpoint can be saved")
    if args.init and (args.set or args.no_qk_norm):
        raise SystemExit("--init trains the checkpoint's LLM as it is: --set and --no-qk-norm do not apply")
    torch.manual_seed(args.seed)
    overrides = parse_set(args.set)
    ovis = Ovis.from_pretrained(args.init) if args.init else None
    if ovis is not None and ovis.llm.config.vocab_size < VALUES.stop:
        raise SystemExit(f"--init {args.init}: vocabulary of {ovis.llm.config.vocab_size} tokens, "
                         f"recall needs ids up to {VALUES.stop - 1}")
    model = ovis.llm if ovis is not None else model_for(overrides, args.seed)
    if args.no_qk_norm:
        drop_qk_norm(model)
    n_params = sum(p.numel() for p in model.parameters())
    qk = ("no QK-norm" if args.no_qk_norm else "QK-norm phased in over {:g}-{:g} of the run".format(
        *args.qk_norm_phase_in) if args.qk_norm_phase_in else f"QK-norm gains at {args.qk_norm_lr_mult:g} x LR")
    print(f"{args.pairs} pairs, batch {args.batch}, LR {args.lr} ({qk}), LLM overrides {overrides or 'none'} "
          f"({n_params / 1e6:.2f}M parameters); guessing among the values: {1 / args.pairs:.2f}\n")
    asked = args.queries or args.pairs
    queries = " | ".join(f"query {i + 1} (elimination {1 / (args.pairs - i):.2f})" for i in range(asked))
    print(f"| steps | loss | held-out accuracy | {queries} | seconds |\n|---|---|---|" + "---|" * (asked + 1))
    curve = train(model, args.pairs, args.steps, args.batch, args.lr, args.every, args.seed, args.queries,
                  args.qk_norm_lr_mult, args.qk_norm_phase_in)
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
