"""What the subcommands share: the user-error exception and argument types.

A subcommand raises CLIError (or lets a library error with a clear message
propagate); `ssattn.apps.cli.main` prints it as "ssattn COMMAND: message" on
stderr and exits with code 2, never with a traceback (SSATTN_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse


class CLIError(Exception):
    """A bad argument or input: its message is all the user sees."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
