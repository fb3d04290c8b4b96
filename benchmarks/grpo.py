"""GRPO rollout throughput and where a step's time goes (generation vs optimisation).

The demo's tiny Ovis (recipe `recipes/tiny/p5.toml`, random weights) on the synthetic world's P5 prompts
(one image each, verifiable answers): 16 prompts x 6 responses per step, up to 32 new tokens at temperature
1, rollouts from the built-in batched engine; the first step (warm-up) is left out.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from common import PeakMemory, pick, table

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "p5.toml"


def run(mode: str) -> dict:
    from ovis25.synth import build_world, write_model_dir
    from ovis25.train import load_recipe, train
    torch.manual_seed(0)
    steps = pick(mode, 8, 3, 2)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        root = Path(tmp)
        world = root / "world"
        build_world(world, seed=0, sizes={"grpo": 16, "caption": 1})
        info = json.loads((world / "datainfo.json").read_text())
        info["synth_grpo"] = {"meta_file": "grpo.jsonl", "image_dir": "images", "data_format": "conversation"}
        (world / "datainfo.json").write_text(json.dumps(info))
        init = write_model_dir(root / "init", world / "tokenizer")
        overrides = [f'init="{init}"', f'out_dir="{root / "run"}"', f'datainfo="{world / "datainfo.json"}"',
                     f"max_steps={steps}", "epochs=8", "progress=false", "export=false"]
        if mode == "smoke":
            overrides += ["grpo_prompts_per_step=2", "grpo_group_size=2"]
        cfg = load_recipe(RECIPE, overrides)
        train(cfg)
        metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    group, prompts = cfg.extra["grpo_group_size"], cfg.extra["grpo_prompts_per_step"]
    n = group * prompts
    rows = [{"step": r["step"], "responses_per_s": n / r["rollout_s"],
             "tokens_per_s": n * r["response_tokens"] / r["rollout_s"], "rollout_s": r["rollout_s"],
             "step_s": r["step_s"], "generation_share": r["rollout_s"] / r["step_s"]} for r in metrics[1:]]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "step"}
    return {"config": {"group": group, "prompts": prompts, "max_new_tokens": cfg.extra["grpo_max_new_tokens"],
                       "steps": steps}, "rows": rows, "mean": {"step": "mean", **mean, **mem.columns()}}


def render(result: dict) -> str:
    c = result["config"]
    return (f"{c['prompts']} prompts x {c['group']} responses per step, up to {c['max_new_tokens']} new tokens; "
            f"mean of steps 2-{c['steps']}.\n\n" +
            table([result["mean"]], {"responses_per_s": "responses/s", "tokens_per_s": "generated tokens/s",
                                     "rollout_s": "rollout s/step", "step_s": "whole step s",
                                     "generation_share": "share of the step spent generating",
                                     "peak_rss_gb": "peak RSS GB"}))
