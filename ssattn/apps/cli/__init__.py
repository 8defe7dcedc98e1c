"""The `ssattn` command: one module per subcommand, each with register(subparsers).

Subcommand modules import heavy dependencies (transformers, scikit-image)
inside their run functions, so `ssattn --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "guide", "route", "train", "eval", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssattn", description="Semantic-sensitive underwater image enhancement kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ssattn.apps.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ssattn.apps.cli.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
