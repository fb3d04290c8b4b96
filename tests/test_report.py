"""The demo report's paired comparisons: a gain is called measured only when it is outside its 95% interval."""
import json
import random

import pytest

from ovis25.eval import paired_gain
from ovis25.report import PAIR_LABELS, gain_cell, write_report


def test_paired_gain_mean_and_interval():
    gain, half = paired_gain([0, 0, 1, 1], [1, 0, 1, 1])  # differences 1, 0, 0, 0: sd 0.5 over 4 items
    assert gain == pytest.approx(0.25) and half == pytest.approx(1.96 * 0.5 / 2)
    assert paired_gain([0.2, 0.4, 0.6], [0.3, 0.5, 0.7]) == (pytest.approx(0.1), pytest.approx(0.0))
    with pytest.raises(ValueError, match="3 and 2"):
        paired_gain([0, 1, 0], [1, 1])


def test_gain_cell_tells_a_gain_from_noise():
    rng = random.Random(0)
    before = [rng.random() for _ in range(200)]
    assert gain_cell(before, [b + 0.05 + rng.gauss(0, 0.05) for b in before]).endswith("(a gain)")
    assert gain_cell(before, [b - 0.05 + rng.gauss(0, 0.05) for b in before]).endswith("(a loss)")
    assert gain_cell(before, [b + rng.gauss(0, 0.3) for b in before]).endswith("(within noise)")
    assert gain_cell([1.0], [0.0]) == ""  # one item has no interval


def test_report_tables_carry_the_paired_changes(tmp_path):
    wins = {"p3": [1, 0] * 50, "p4": [1, 1] * 50}  # differences 0, 1, ...: sd 0.5025 over 100 pairs
    (tmp_path / "preference.json").write_text(json.dumps(  # every second pair a faithfulness pair: those flip
        {p: {"accuracy": sum(w) / len(w), "n": len(w), "mean_margin": 1.0, "wins": w,
             "kinds": ["answer", "unfaithful"] * 50}
         for p, w in wins.items()}))
    items = {"p4": {"count": [0.0, 0.5] * 100, "ocr": [0.25] * 200}, "p5": {"count": [0.0, 0.5] * 100, "ocr": [0.5] * 200}}
    (tmp_path / "reward.json").write_text(json.dumps(
        {p: {t: {"reward": sum(v) / len(v), "n": 4 * len(v), "item_rewards": v} for t, v in tasks.items()}
         for p, tasks in items.items()}))
    report = write_report(tmp_path, {}, {"total": 1.0}).read_text()
    assert f"| {PAIR_LABELS['answer']} | 1.000 | 1.000 | +0.000 ± 0.000 (within noise) | 50 |" in report
    assert f"| {PAIR_LABELS['unfaithful']} | 0.000 | 1.000 | +1.000 ± 0.000 (a gain) | 50 |" in report
    assert report.index(PAIR_LABELS["answer"]) < report.index(PAIR_LABELS["unfaithful"]) < report.index("| all |")
    assert "| all | 0.500 | 1.000 | +0.500 ± 0.098 (a gain) | 100 |" in report
    assert "| count | 0.250 | 0.250 | +0.000 ± 0.000 (within noise) | 800 |" in report
    assert "| ocr | 0.250 | 0.500 | +0.250 ± 0.000 (a gain) | 800 |" in report
    assert "| mean | 0.250 | 0.375 | +0.125 ± 0.012 (a gain) | |" in report
