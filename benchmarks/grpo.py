"""GRPO rollout throughput and where a step's time goes (generation vs optimisation).

A tiny Ovis (the demo's preset, random weights) on the synthetic world's P5 prompts (images, verifiable
answers): 16 prompts x 6 responses per step, up to 24 new tokens, temperature 1, built-in batched engine.
    python benchmarks/grpo.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import table, write_results
from ovis25.synth import build_world, write_model_dir
from ovis25.train import load_recipe, train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "p5.toml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    steps = 3 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = root / "world"
        build_world(world, seed=0, sizes={"grpo": 16, "caption": 1})
        info = json.loads((world / "datainfo.json").read_text())
        info["synth_grpo"] = {"meta_file": "grpo.jsonl", "image_dir": "images", "data_format": "conversation"}
        (world / "datainfo.json").write_text(json.dumps(info))
        init = write_model_dir(root / "init", world / "tokenizer")
        cfg = load_recipe(RECIPE, [f'init="{init}"', f'out_dir="{root / "run"}"', f'datainfo="{world / "datainfo.json"}"',
                                   f"max_steps={steps}", "epochs=8", "progress=false", "export=false"])
        train(cfg)
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    group, prompts = cfg.extra["grpo_group_size"], cfg.extra["grpo_prompts_per_step"]
    out = []
    for r in rows[1:]:  # the first step includes warm-up
        n = group * prompts
        out.append({"step": r["step"], "responses_per_s": n / r["rollout_s"],
                    "tokens_per_s": n * r["response_tokens"] / r["rollout_s"], "rollout_s": r["rollout_s"],
                    "step_s": r["step_s"], "generation_share": r["rollout_s"] / r["step_s"]})
    mean = {k: sum(r[k] for r in out) / len(out) for k in out[0] if k != "step"}
    print(table(out + [{"step": "mean", **mean}], ["step", "responses_per_s", "tokens_per_s", "rollout_s", "step_s",
                                                   "generation_share"]))
    write_results("grpo" + ("-quick" if args.quick else ""), out, {"group": group, "prompts": prompts,
                                                                  "max_new_tokens": cfg.extra["grpo_max_new_tokens"]})


if __name__ == "__main__":
    main()
