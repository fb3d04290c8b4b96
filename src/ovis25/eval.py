"""Evaluation on a JSONL benchmark: accuracy per task, with thinking on and/or off.

A benchmark line is `{"id", "task", "question" | "conversations", "image": path | [paths] |
"video_frames": [paths], "answer", "metric"[, "category"]}` with paths relative to the file's folder (or
`image_dir`) and metric the name of a reward in `ovis25.train.rewards.REWARDS` (exact, number, choice, iou,
...; `iou` counts a hit at IoU >= 0.5 and also reports mean IoU). Items with a `category` (a sub-kind of
their task, e.g. how many objects there are to count) are also scored per category.
The synthetic world's held-out split (`WORLD/test.jsonl`, images under `WORLD/images`) is the `synth` suite.

    python -m ovis25.eval MODEL_DIR --suite synth --world runs/demo/world [--thinking both] [--out eval.json]
    python -m ovis25.eval MODEL_DIR --data my_bench.jsonl --image-dir images/
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .processing.image import PixelBudgets
from .grounding import parse_boxes
from .train.rewards import REWARDS, answer_text

IOU_HIT = 0.5


@dataclass
class EvalItem:
    id: str
    task: str
    conversations: list[dict]
    images: list[Path]
    video: list[Path] | None
    answer: str
    metric: str
    category: str = ""

    def pixels(self, budgets: PixelBudgets | None) -> dict[str, int]:
        return media_pixels(budgets, len(self.images), self.video is not None)


def media_pixels(budgets: PixelBudgets | None, images: int, video: bool) -> dict[str, int]:
    """The resize options for a sample with these media: its kind's budget (no budgets: the chat defaults)."""
    return budgets.for_media(images, int(video)) if budgets else {}


def load_items(path: str | Path, image_dir: str | Path | None = None, limit_per_task: int | None = None) -> list[EvalItem]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such benchmark file")
    root = Path(image_dir) if image_dir is not None else path.parent
    items, per_task = [], defaultdict(int)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        missing = [k for k in ("answer",) if k not in row] + ([] if "question" in row or "conversations" in row
                                                              else ["question"])
        if missing:
            raise ValueError(f"{path}: line {n}: missing field(s) {', '.join(missing)}")
        task = row.get("task", "default")
        if limit_per_task is not None and per_task[task] >= limit_per_task:
            continue
        per_task[task] += 1
        images = row.get("image") or []
        images = [root / p for p in ([images] if isinstance(images, str) else images)]
        video = [root / p for p in row["video_frames"]] if row.get("video_frames") else None
        conversations = row.get("conversations") or [
            {"from": "human", "value": "<video>\n" * bool(video) + "<image>\n" * len(images) + row["question"]}]
        if row.get("metric", "exact") not in REWARDS:
            raise ValueError(f"{path}: line {n}: unknown metric {row['metric']!r}; known: {sorted(REWARDS)}")
        items.append(EvalItem(str(row.get("id", n)), task, conversations, images, video, str(row["answer"]),
                              row.get("metric", "exact"), str(row.get("category", ""))))
    return items


def same_media_batches(items: list[EvalItem], size: int, budgets: PixelBudgets | None):
    """Runs of at most `size` consecutive items that share one resize budget -> (items, pixel options)."""
    start = 0
    while start < len(items):
        pixels = items[start].pixels(budgets)
        end = start + 1
        while end < min(start + size, len(items)) and items[end].pixels(budgets) == pixels:
            end += 1
        yield items[start:end], pixels
        start = end


def is_hit(row: dict) -> float:
    """An answer row's accuracy: its score, or for IoU whether the box overlaps enough (>= IOU_HIT)."""
    return float(row["score"] >= IOU_HIT) if row["metric"] == "iou" else row["score"]


def evaluate(chat, items: list[EvalItem], enable_thinking: bool, max_new_tokens: int = 64,
             thinking_budget: int | None = None, batch_size: int = 16, progress: bool = True,
             budgets: PixelBudgets | None = None) -> tuple[dict, list[dict]]:
    """Greedy answers for every item -> ({task: {"accuracy", "n", "thinking"[, "mean_iou"]}}, per-item rows).
    budgets: each item's resize budget by its media (single image, several, video), as in training."""
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc=f"eval thinking={'on' if enable_thinking else 'off'}", unit="q",
                   leave=False)
    for chunk, pixels in same_media_batches(items, batch_size, budgets):
        results = chat.generate_batch([it.conversations for it in chunk], images=[it.images or None for it in chunk],
                                      videos=[[it.video] if it.video else None for it in chunk],
                                      enable_thinking=enable_thinking, thinking_budget=thinking_budget,
                                      max_new_tokens=max_new_tokens, **pixels)
        for it, res in zip(chunk, results):
            value = REWARDS[it.metric]("", res.text, it.answer)
            rows.append({"id": it.id, "task": it.task, "answer": it.answer, "response": res.text,
                         "thinking": res.thinking, "metric": it.metric, "score": value,
                         "prompt_tokens": res.usage["prompt_tokens"],
                         **({"category": it.category} if it.category else {})})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return summarize(rows, enable_thinking), rows


def summarize(rows: list[dict], enable_thinking: bool) -> dict[str, dict]:
    """Scored answer rows -> {task: {"accuracy", "n", "thinking"[, "mean_iou", "with_box"][, "categories":
    {category: {"accuracy", "n"[, "mean_iou"]}} in sorted order, when its rows have categories]}}."""
    summary: dict[str, dict] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        scores = [r for r in rows if r["task"] == task]
        summary[task] = {**score_summary(scores), "thinking": enable_thinking}
        if scores[0]["metric"] == "iou":
            # a broken answer format (no box at all) looks like bad aim in the IoU alone
            summary[task]["with_box"] = sum(bool(parse_boxes(answer_text(r["response"]))) for r in scores) / len(scores)
        by_category: dict[str, list[dict]] = {}
        for r in scores:
            if r.get("category"):
                by_category.setdefault(r["category"], []).append(r)
        if by_category:
            summary[task]["categories"] = {c: score_summary(by_category[c]) for c in sorted(by_category)}
    return summary


def score_summary(rows: list[dict]) -> dict:
    """Scored rows of one metric -> {"accuracy", "n"[, "mean_iou"]}."""
    hits = [is_hit(r) for r in rows]
    out = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    if rows[0]["metric"] == "iou":
        out["mean_iou"] = sum(r["score"] for r in rows) / len(rows)
    return out


GUESSING = "constant answer"  # the label of constant_answer_baseline's column beside a model's


def constant_answer_baseline(rows: list[dict]) -> dict[str, dict]:
    """What a model that ignores the image reaches on these items: per task, the summary of always giving
    the one reference answer that scores best on them (the most common one, or for boxes the best single
    box). Chosen on the items themselves, so it is an upper bound on guessing."""
    best_rows = []
    for task in dict.fromkeys(r["task"] for r in rows):
        items = [r for r in rows if r["task"] == task]
        answers = [[{**r, "response": a, "score": REWARDS[r["metric"]]("", a, r["answer"])} for r in items]
                   for a in dict.fromkeys(r["answer"] for r in items)]
        best_rows += max(answers, key=lambda scored: sum(r["score"] for r in scored))
    return summarize(best_rows, False)


def preference_accuracy(model, processor, pairs: list[dict], image_dir: Path,
                        budgets: PixelBudgets | None = None) -> dict:
    """Share of preference pairs whose chosen response has the higher log-probability under the model
    -> {"accuracy", "n", "mean_margin", "wins" (1/0 per pair, in order, for `paired_gain`), "kinds" (per pair:
    its "kind" field, else "thinking" or "answer" by whether the chosen response holds a think block)}.

    pairs: {"conversations" (the prompt), "image" | "video_frames", "chosen", "rejected"[, "kind"]}."""
    import torch

    from .train.packing import shifted_targets
    wins, margins = [], []
    model.eval()
    for pair in pairs:
        images = pair.get("image") or []
        images = [image_dir / p for p in ([images] if isinstance(images, str) else images)]
        videos = [[image_dir / p for p in pair["video_frames"]]] if pair.get("video_frames") else None
        pixels = media_pixels(budgets, len(images), videos is not None)
        logps = []
        for response in (pair["chosen"], pair["rejected"]):
            conv = pair["conversations"] + [{"from": "gpt", "value": response}]
            ids, labels, pv, grid = processor.format_conversation(conv, images=images or None, videos=videos, **pixels)
            with torch.no_grad():
                out = model(ids[None], pv, grid, targets=shifted_targets(labels)[None])
            logps.append(-float(out.loss))
        wins.append(int(logps[0] > logps[1]))
        margins.append(logps[0] - logps[1])
    return {"accuracy": sum(wins) / len(pairs), "n": len(pairs), "mean_margin": sum(margins) / len(margins),
            "wins": wins, "kinds": [pair.get("kind") or ("thinking" if "<think>" in pair["chosen"] else "answer")
                                    for pair in pairs]}


def pairs_by_kind(kinds: list[str]) -> dict[str, list[int]]:
    """Indices of the pairs of each kind (in order of first appearance), then "all": the groups that
    preference accuracy is reported over (`preference_accuracy`'s "kinds")."""
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
    return {**groups, "all": list(range(len(kinds)))}


def sampled_reward(chat, items: list[EvalItem], samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 32,
                   seed: int = 0, batch_size: int = 64, budgets: PixelBudgets | None = None) -> dict[str, dict]:
    """The mean reward of `samples` sampled answers per item, per task -> {task: {"reward", "n", "item_rewards"}}
    (n: answers; item_rewards: each item's mean, in item order, for `paired_gain`). What GRPO maximises, on
    held-out prompts: the item's metric as a reward (`iou` continuous, not a hit).

    Answer k of item i samples with its own seed, `seed + i * samples + k`, whatever the batching: two models
    scored this way draw from the same random numbers on every item (common random numbers), so where their
    distributions agree they sample the same answer, and the paired change between them measures the models
    rather than the dice (the demo's P4 -> P5 change: intervals about half as wide as with one shared random
    stream, DEMO.md)."""
    scores: dict[str, list[float]] = {}
    per_batch, first = max(1, batch_size // samples), 0  # first: the chunk's first item's place in `items`
    for chunk, pixels in same_media_batches(items, per_batch, budgets):
        results = chat.generate_batch([it.conversations for it in chunk],
                                      images=[it.images or None for it in chunk],
                                      videos=[[it.video] if it.video else None for it in chunk], n=samples,
                                      seeds=[seed + (first + i) * samples for i in range(len(chunk))],
                                      do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                                      **pixels)
        for it, res in zip([it for it in chunk for _ in range(samples)], results):
            scores.setdefault(it.task, []).append(REWARDS[it.metric]("", res.text, it.answer))
        first += len(chunk)
    return {task: {"reward": sum(v) / len(v), "n": len(v),
                   "item_rewards": [sum(v[i:i + samples]) / samples for i in range(0, len(v), samples)]}
            for task, v in scores.items()}


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean per-item gain of `after` over `before` (the same items, in the same order) and the half-width of
    its 95% interval (normal approximation over items): a gain is measured when it exceeds the half-width."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"paired_gain: need two equal lists of >= 2 items, got {len(before)} and {len(after)}")
    diffs = [b - a for a, b in zip(before, after)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, 1.96 * (var / len(diffs)) ** 0.5


def accuracy_cell(summary: dict) -> str:
    return f"{summary['accuracy']:.2f}" + (f" (IoU {summary['mean_iou']:.2f})" if "mean_iou" in summary else "")


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """results: {column label: {task: summary}} -> markdown table of accuracies (mean IoU in brackets)."""
    tasks = list(dict.fromkeys(t for col in results.values() for t in col))
    lines = ["| task | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for t in tasks:
        cells = []
        for col in results.values():
            s = col.get(t)
            cells.append("" if s is None else accuracy_cell(s)
                         + (f" no box in {1 - s['with_box']:.2f}" if s.get("with_box", 1) < 1 else ""))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_category_table(results: dict[str, dict[str, dict]]) -> str:
    """As `format_table`, a row per (task, category) for the tasks whose summaries have categories, with the
    number of items; "" when none has."""
    rows = list(dict.fromkeys((t, c) for col in results.values() for t, s in col.items()
                              for c in s.get("categories", {})))
    if not rows:
        return ""
    lines = ["| task | category | " + " | ".join(results) + " | n |", "|---|---|" + "---|" * (len(results) + 1)]
    for t, c in rows:
        cells = [col.get(t, {}).get("categories", {}).get(c) for col in results.values()]
        n = max((s["n"] for s in cells if s), default=0)
        lines.append(f"| {t} | {c} | " + " | ".join("" if s is None else accuracy_cell(s) for s in cells) + f" | {n} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    from .chat import Chat
    from .cli import positive_int
    ap = argparse.ArgumentParser(prog="ovis25 eval", description="Accuracy per task on a JSONL benchmark.")
    ap.add_argument("model_dir")
    ap.add_argument("--suite", choices=["synth"], help="the synthetic world's held-out split (needs --world)")
    ap.add_argument("--world", help="a synthetic world directory (python -m ovis25.synth)")
    ap.add_argument("--data", help="a JSONL benchmark file")
    ap.add_argument("--image-dir")
    ap.add_argument("--thinking", choices=["on", "off", "both"], default="both")
    ap.add_argument("--budget", type=positive_int, default=None, help="thinking budget in tokens")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    ap.add_argument("--limit", type=positive_int, default=None, help="at most this many items per task")
    ap.add_argument("--min-pixels", type=int, default=32 * 32, help="resize budget of an image (and, unless set "
                    "below, of each of several images and of each video frame); use the budgets the model trained on")
    ap.add_argument("--max-pixels", type=int, default=256 * 256)
    for kind in ("multiple-image", "video"):
        for bound in ("min", "max"):
            ap.add_argument(f"--{kind}-{bound}-pixels", type=int, default=None)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--answers", help="write every item's answer and score here (JSONL; one row per item and mode)")
    args = ap.parse_args(argv)
    if args.suite == "synth":
        if not args.world:
            sys.exit("ovis25 eval: --suite synth needs --world DIR")
        data, image_dir = Path(args.world) / "test.jsonl", Path(args.world) / "images"
    elif args.data:
        data, image_dir = Path(args.data), args.image_dir
    else:
        sys.exit("ovis25 eval: give --suite synth --world DIR or --data FILE")
    try:
        # the image's budget, for every kind not given its own
        own = {k: v for k, v in vars(args).items() if k.startswith(("multiple_image_", "video_")) and v is not None}
        budgets = PixelBudgets(**{**vars(PixelBudgets.uniform(args.min_pixels, args.max_pixels)), **own})
        items = load_items(data, image_dir, args.limit)
        chat = Chat.from_pretrained(args.model_dir, dtype=torch.float32)
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.thinking]
        results, answers = {}, []
        for think in modes:
            summary, rows = evaluate(chat, items, think, args.max_new_tokens, args.budget, budgets=budgets)
            results[f"thinking {'on' if think else 'off'}"] = summary
            answers += [{**row, "enable_thinking": think} for row in rows]
    except ValueError as e:
        sys.exit(f"ovis25 eval: {e}")
    # the guessing level beside the model: an image-blind constant answer (not a mode, so not in --out); the
    # items are the same in every mode, so one mode's rows give it
    print(format_table({**results, GUESSING: constant_answer_baseline(rows)}))
    by_category = format_category_table(results)  # a constant answer can be right on a whole category
    if by_category:
        print("\nBy category:\n" + by_category)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(row) + "\n" for row in answers))


if __name__ == "__main__":
    main()
