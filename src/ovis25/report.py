"""The demo's report: `report.md` with loss curves per phase, accuracy per task after each phase and a
few test images with the final model's answers (grounding boxes drawn)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .eval import GUESSING, constant_answer_baseline, format_category_table, format_table, paired_gain, pairs_by_kind
from .grounding import draw_grounding, parse_boxes


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_losses(run: Path, out: Path) -> bool:
    plt = _plt()
    phases = [p for p in sorted(run.glob("p*/metrics.jsonl"))]
    if plt is None or not phases:
        return False
    fig, ax = plt.subplots(figsize=(9, 3.5))
    offset = 0
    for file in phases:
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        key = "loss" if rows and "loss" in rows[0] else None
        if key is None:
            continue
        ax.plot([offset + r["step"] for r in rows], [r[key] for r in rows], label=file.parent.name)
        offset += rows[-1]["step"]
    ax.set(xlabel="step (phases back to back)", ylabel="training loss", title="loss per phase")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def plot_accuracy(results: dict, out: Path, baseline: dict | None = None) -> bool:
    """Bars per task and phase (mean IoU for box answers, which are rarely exact), with `baseline` (a
    summary such as `constant_answer_baseline`) drawn across each task's bars."""
    plt = _plt()
    if plt is None or not results:
        return False
    columns = list(results)
    tasks = list(dict.fromkeys(t for col in results.values() for t in col))

    def score(summary: dict) -> float:
        return summary.get("mean_iou", summary.get("accuracy", 0.0))

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(columns)
    for i, col in enumerate(columns):
        ax.bar([t + i * width for t in range(len(tasks))], [score(results[col].get(task, {})) for task in tasks],
               width, label=col)
    for t, task in enumerate(tasks):
        if baseline and task in baseline:
            ax.hlines(score(baseline[task]), t - width / 2, t + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label=GUESSING if t == 0 else None)
    iou = {t for col in results.values() for t, s in col.items() if "mean_iou" in s}
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], [f"{t} (IoU)" if t in iou else t for t in tasks])
    ax.set(ylabel="accuracy (boxes: mean IoU)", ylim=(0, 1), title="held-out accuracy per task after each phase")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def example_images(run: Path, answers_file: Path, out_dir: Path, per_task: int = 1) -> list[tuple[str, str, dict]]:
    """Save a few test images with the answer (boxes drawn for grounding); returns (file, caption, row)."""
    if not answers_file.exists():
        return []
    test = {json.loads(line)["id"]: json.loads(line) for line in (run / "world" / "test.jsonl").read_text().splitlines()
            if line.strip()}
    rows = [json.loads(line) for line in answers_file.read_text().splitlines() if line.strip()]
    out_dir.mkdir(exist_ok=True)
    shown, examples = {}, []
    for row in rows:
        item = test.get(row["id"])
        if item is None or shown.get(row["task"], 0) >= per_task:
            continue
        path = item.get("image") or (item.get("video_frames") or [None])[0]
        if isinstance(path, list):
            path = path[0]
        if path is None:
            continue
        image = Image.open(run / "world" / "images" / path).convert("RGB")
        if parse_boxes(row["response"]):
            image = draw_grounding(image, row["response"], color="red")
        if parse_boxes(row["answer"]):
            image = draw_grounding(image, row["answer"], color="green", width=1)
        name = f"{row['task']}.png"
        image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(out_dir / name)
        shown[row["task"]] = shown.get(row["task"], 0) + 1
        examples.append((f"{out_dir.name}/{name}", item.get("question", ""), row))
    return examples


def gain_cell(before: list[float], after: list[float]) -> str:
    """'+0.014 ± 0.012 (a gain)': the paired change and its 95% interval, and whether it is outside noise."""
    try:
        gain, half = paired_gain(before, after)
    except ValueError:  # unequal or too few items: no interval to give
        return ""
    verdict = "within noise" if abs(gain) <= half else ("a gain" if gain > 0 else "a loss")
    return f"{gain:+.3f} ± {half:.3f} ({verdict})"


PAIR_LABELS = {"answer": "answer only: right vs wrong answer (perception)",
               "misled": "thinking: right trace vs one misreading the image (perception)",
               "unfaithful": "thinking: answer following the trace vs contradicting it (faithfulness)",
               "thinking": "thinking mode"}


def preference_table(pref: dict) -> list[str]:
    """Preference accuracy after each phase, by kind of pair, with the first -> last change."""
    phases = list(pref)
    first, last = pref[phases[0]], pref[phases[-1]]
    groups = pairs_by_kind(first["kinds"])
    rank = {k: i for i, k in enumerate([*PAIR_LABELS, "all"])}  # unknown kinds just before "all"
    groups = {k: groups[k] for k in sorted(groups, key=lambda k: rank.get(k, len(PAIR_LABELS) - 0.5))
              if len(groups) > 2 or k == "all"}  # one kind only: its row would repeat "all"
    lines = [f"Preference accuracy (held-out DPO pairs: the chosen response more likely than the rejected one, per "
             f"token), and the change {phases[0]} -> {phases[-1]} with its 95% interval over pairs:", "",
             "| pairs | " + " | ".join(f"after {p}" for p in phases) + " | change | pairs |",
             "|---|" + "---|" * (len(phases) + 2)]
    for label, idx in groups.items():
        accuracy = [sum(pref[p]["wins"][i] for i in idx) / len(idx) for p in phases]
        change = gain_cell([first["wins"][i] for i in idx], [last["wins"][i] for i in idx]) if len(phases) > 1 else ""
        lines += [f"| {PAIR_LABELS.get(label, label)} | " + " | ".join(f"{a:.3f}" for a in accuracy)
                  + f" | {change} | {len(idx)} |"]
    return lines + ["| mean log-prob margin | " + " | ".join(f"{pref[p]['mean_margin']:.2f}" for p in phases)
                    + " | | |", ""]


def with_guessing_level(run: Path, results: dict) -> dict:
    """`results` and a last column, the constant-answer baseline on the items the phases were scored on."""
    answer_files = sorted(run.glob("p*/answers.jsonl"))
    if not answer_files:
        return results
    rows = [json.loads(line) for line in answer_files[-1].read_text().splitlines() if line.strip()]
    return {**results, GUESSING: constant_answer_baseline(rows)}


def write_report(run: Path, results: dict, timings: dict) -> Path:
    lines = [f"# ovis25 demo run `{run.name}`", "",
             "A tiny Ovis2.5 trained from scratch on CPU through the curriculum on the synthetic world; "
             "accuracy is on the held-out test split (greedy decoding).", ""]
    lines += ["## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [""]
    if (run / "p0v" / "token_accuracy.json").exists():
        vision = json.loads((run / "p0v" / "token_accuracy.json").read_text())
        lines += ["## Vision pretraining (P0v): held-out visual-token accuracy", "",
                  "Class accuracy, and how far (in image widths and heights) the position words put a token "
                  "from where it is.", "",
                  "| task | all tokens | tokens showing something | position error |", "|---|---|---|---|"]
        lines += [f"| {task} | {a['tokens']:.2f} | {a['objects']:.2f} | "
                  + (f"{a['position_error']:.3f} |" if "position_error" in a else "- |") for task, a in vision.items()]
        lines += [""]
    columns = with_guessing_level(run, results)
    lines += ["## Accuracy per task (held out)", "",
              "Greedy answers; `constant answer` is what ignoring the image reaches: always the one reference answer "
              "(for boxes, the one box) that scores best on these items.", "", format_table(columns), ""]
    if (run / "lookup.json").exists():
        lines += ["## The look-ups (before P2)", "",
                  "Held-out accuracy on the look-up world's test questions after each look-up phase: the named "
                  "object's place and spatial relations on one-token grids, and spatial relations on the demo's "
                  "scenes.", "", format_table(json.loads((run / "lookup.json").read_text())), ""]
    # no constant-answer column: within a category one answer can be right every time (a count's)
    by_category = format_category_table({k: v for k, v in results.items() if not k.endswith("+think")})
    if by_category:
        lines += ["## Accuracy by category (held out, thinking off)", "",
                  "The same answers split by what sets a question apart within its task (how many objects to count, "
                  "how long a text, what a chart question asks): how far along a task each target is reached. "
                  "`n`: items per category, few, so a cell moves by a few tenths between runs.", "", by_category, ""]
    if (run / "preference.json").exists():
        lines += preference_table(json.loads((run / "preference.json").read_text()))
    if (run / "p5" / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run / "p5" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
        if rewards:
            k = max(1, len(rewards) // 3)
            lines += [f"GRPO mean rollout reward: first {k} steps {sum(rewards[:k]) / k:.3f}, "
                      f"last {k} steps {sum(rewards[-k:]) / k:.3f}", ""]
    if (run / "reward.json").exists():
        sampled = json.loads((run / "reward.json").read_text())
        phases = list(sampled)
        tasks = list(dict.fromkeys(t for v in sampled.values() for t in v))
        first, last = sampled[phases[0]], sampled[phases[-1]]
        lines += ["Held-out reward of sampled answers (temperature 1, as in GRPO's rollouts; grounding: mean IoU; "
                  "each answer drawn with the same seed in every phase), "
                  f"and the change {phases[0]} -> {phases[-1]} with its 95% interval over questions:", "",
                  "| task | " + " | ".join(phases) + " | change | answers |", "|---|" + "---|" * (len(phases) + 2)]
        for t in tasks:
            change = gain_cell(first[t]["item_rewards"], last[t]["item_rewards"]) if t in first and t in last else ""
            lines += [f"| {t} | " + " | ".join(f"{sampled[p][t]['reward']:.3f}" if t in sampled[p] else ""
                                                for p in phases) + f" | {change} | {last.get(t, {}).get('n', '')} |"]
        means = [sum(v["reward"] for v in sampled[p].values()) / len(sampled[p]) for p in phases]
        both = [t for t in tasks if t in first and t in last]
        pooled = [[x for t in both for x in part[t]["item_rewards"]] for part in (first, last)]
        lines += ["| mean | " + " | ".join(f"{m:.3f}" for m in means) + f" | {gain_cell(*pooled)} | |", ""]
    if plot_accuracy(results, run / "accuracy.png", columns.get(GUESSING)):
        lines += ["![accuracy](accuracy.png)", ""]
    if plot_losses(run, run / "loss.png"):
        lines += ["## Training loss", "", "![loss](loss.png)", ""]
    final_phase = sorted(p.name for p in run.glob("p*") if (p / "answers.jsonl").exists())
    if final_phase:
        examples = example_images(run, run / final_phase[-1] / "answers.jsonl", run / "examples")
        if examples:
            lines += [f"## Examples (model after {final_phase[-1]}; red: predicted box, green: reference)", ""]
            for file, question, row in examples:
                verdict = "correct" if row["score"] >= (0.5 if row["metric"] == "iou" else 1) else "wrong"
                lines += [f"**{row['task']}** — {question}  ", f"answer: `{row['response']}` "
                          f"(reference `{row['answer']}`, {verdict})  ", f"![{row['task']}]({file})", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
