"""python -m ovis25.synth OUT_DIR [--preset tiny|ci] [--seed N] [--no-tokenizer]"""
from __future__ import annotations

import argparse
import json

from .build import PRESETS, build_world


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ovis25.synth", description="Build the synthetic world.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true", help="skip training the world's BPE")
    args = ap.parse_args(argv)
    manifest = build_world(args.out_dir, seed=args.seed, sizes=args.preset, tokenizer=not args.no_tokenizer,
                           progress=True)
    print(f"{args.out_dir}: {manifest['images']} images; samples {json.dumps(manifest['samples'])}")


if __name__ == "__main__":
    main()
