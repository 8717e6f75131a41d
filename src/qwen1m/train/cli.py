"""``qwen1m train --recipe FILE``: registered by ``qwen1m.cli`` through ``add_train_command``; also
``python -m qwen1m.train.cli --recipe FILE`` (``main_train``). The trainer imports nothing from here."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train a model from a recipe file (progressive context extension)")
    p.add_argument("--recipe", required=True, help="JSON recipe, e.g. recipes/toy.json or recipes/bundled.json")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/state.pt exists")
    p.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    import logging

    from qwen1m.train.recipe import load_recipe
    from qwen1m.train.trainer import run_recipe

    logging.getLogger("qwen1m.train").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(message)s")
    recipe = load_recipe(args.recipe)
    out = Path(args.out or os.path.join("runs", recipe.name))
    final = run_recipe(recipe, out, args.device, resume=not args.no_resume)
    print(f"final checkpoint: {final}")
    print(f"log: {out / 'train_log.json'}")
    return 0


def main_train(argv: list[str] | None = None) -> int:
    """``qwen1m train --recipe FILE [--out DIR] [--device cpu|cuda] [--no-resume]`` as a function."""
    parser = argparse.ArgumentParser(prog="qwen1m")
    add_train_command(parser.add_subparsers())
    args = parser.parse_args(["train", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main_train())
