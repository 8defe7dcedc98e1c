"""What the subcommands share: the user-error exception and argument types.

A subcommand raises CLIError (or lets a library error with a clear message
propagate); `ssattn.apps.cli.main` prints it as "ssattn COMMAND: message" on
stderr and exits with code 2, never with a traceback (SSATTN_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse


class CLIError(Exception):
    """A bad argument or input: its message is all the user sees."""


def one_line(text: str) -> str:
    """An error message as the one line the CLI prints (a library message may span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)
