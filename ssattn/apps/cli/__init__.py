"""The `ssattn` command: one module per subcommand, each with register(subparsers).

Subcommand modules import heavy dependencies (transformers, scikit-image)
inside their run functions, so `ssattn --help` stays fast. Errors never show
a traceback: the message on stderr and exit code 2 (SSATTN_DEBUG=1 re-raises);
a bad argument is one line too, `ssattn COMMAND: error: ... (see ssattn COMMAND
--help)`, not argparse's usage block (common.Parser).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .common import CLIError, Parser, is_main_rank, one_line, say_error

COMMANDS = ("demo", "guide", "route", "train", "eval", "metrics", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ssattn", description="Semantic-sensitive underwater image enhancement kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ssattn.apps.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ssattn.apps.cli.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.register(sub)
    parser.commands = sub.choices  # {name: the command's parser}
    return parser


# Errors whose message is written for the user (the library names the argument and what was
# expected); anything else is unexpected, and its type is shown with the message.
_USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, whose --help lists what it takes (argparse leaves it to the top one)
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if is_main_rank():
            print(f"ssattn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SSATTN_DEBUG", "") not in ("", "0"):
            raise
        text = one_line(exc) if isinstance(exc, _USER_ERRORS) else f"{type(exc).__name__}: {one_line(exc)}"
        hint = "" if isinstance(exc, _USER_ERRORS) else " (SSATTN_DEBUG=1 shows the traceback)"
        if isinstance(exc, CLIError):  # a bad argument: the same on every rank, so rank 0 says it, once
            say_error(f"ssattn {args.command}: {text or type(exc).__name__}{hint}")
        else:  # a failure at run time can be one rank's alone: that rank says it, naming itself, in one write
            rank = "" if is_main_rank() else f" [rank {os.environ['RANK']}]"
            sys.stderr.write(f"ssattn {args.command}{rank}: {text or type(exc).__name__}{hint}\n")
            sys.stderr.flush()
        return 2
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """End the process group a command made under torchrun, however the command ended: a group left to the
    interpreter's exit keeps its backend's threads running into shutdown, where they can kill the process."""
    if "torch.distributed" in sys.modules:  # no group without it; a command that never needed torch stays light
        from ssattn.apps.distributed import teardown

        teardown()


if __name__ == "__main__":
    sys.exit(main())
