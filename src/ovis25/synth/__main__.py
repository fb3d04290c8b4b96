"""python -m ovis25.synth OUT_DIR [--preset tiny|ci|long] [--seed N] [--no-tokenizer]
python -m ovis25.synth OUT_DIR --heldout-of WORLD --per-task N [--tasks T ...]   (a larger held-out split)"""
from __future__ import annotations

import argparse
import json

from .build import PRESETS, build_heldout, build_world


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ovis25.synth", description="Build the synthetic world.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true", help="skip training the world's BPE")
    ap.add_argument("--heldout-of", metavar="WORLD", help="instead of a world, write a larger held-out split of "
                    "this one (its own test items first; evaluate with --suite synth --world OUT_DIR)")
    ap.add_argument("--per-task", type=int, help="held-out items a task (with --heldout-of)")
    ap.add_argument("--tasks", nargs="+", help="only these tasks (with --heldout-of; default: the world's)")
    args = ap.parse_args(argv)
    if args.heldout_of:
        if args.per_task is None:
            ap.error("--heldout-of needs --per-task N")
        try:
            info = build_heldout(args.heldout_of, args.out_dir, args.per_task, args.tasks, progress=True)
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            ap.error(str(e))
        print(f"{args.out_dir}: held-out items {json.dumps(info['counts'])}")
        return
    if args.per_task is not None or args.tasks:
        ap.error("--per-task and --tasks go with --heldout-of")
    manifest = build_world(args.out_dir, seed=args.seed, sizes=args.preset, tokenizer=not args.no_tokenizer,
                           progress=True)
    print(f"{args.out_dir}: {manifest['images']} images; samples {json.dumps(manifest['samples'])}")


if __name__ == "__main__":
    main()
