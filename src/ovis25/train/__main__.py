"""`python -m ovis25.train RECIPE [key=value ...]` (also under `torchrun --nproc_per_node N -m ovis25.train`)."""
import argparse
import logging
import sys

from ..checkpoint import DirectoryInUseError
from . import load_recipe, train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ovis25 train", description="Train one phase of the Ovis2.5 curriculum.")
    ap.add_argument("recipe", help="TOML recipe file, or '-' for overrides only")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys, e.g. lr=3e-4 max_steps=10")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_recipe(None if args.recipe == "-" else args.recipe, args.overrides)
        print(train(cfg))
    except (ValueError, FileNotFoundError, DirectoryInUseError) as e:
        sys.exit(f"ovis25 train: {e}")


if __name__ == "__main__":
    main()
