"""What the subcommands share: the user-error exception and argument types.

A subcommand raises CLIError (or lets a library error with a clear message
propagate); `ssattn.apps.cli.main` prints it as "ssattn COMMAND: message" on
stderr and exits with code 2, never with a traceback (SSATTN_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys


class CLIError(Exception):
    """A bad argument or input: its message is all the user sees."""


# How torch.load(weights_only=True) starts its message for an object it refuses; the rest advises loading with
# weights_only=False, which runs any code in the file: the CLI never passes that on.
_TORCH_REFUSAL = "Weights only load failed"


def one_line(text: str) -> str:
    """An error message as the one line the CLI prints (a library message may span several), with torch's advice
    to load a refused file unsafely replaced by what it means: not a file of the kind expected."""
    text = str(text)
    if _TORCH_REFUSAL in text:
        text = text[:text.index(_TORCH_REFUSAL)] + ("it holds Python objects other than tensors and plain values, so "
                                                    "it is not a file of the kind expected")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def is_main_rank() -> bool:
    """False in torchrun's ranks other than 0, which leave the job's message to rank 0 (every rank sees the same
    arguments, and two ranks writing at once run their lines together)."""
    return os.environ.get("RANK", "0") in ("", "0")


def say_error(line: str) -> None:
    """Print a command's error line on stderr: once, by rank 0, under torchrun (see is_main_rank)."""
    if is_main_rank():
        print(line, file=sys.stderr)
    else:  # torchrun stops the other ranks when one exits: give rank 0 the moment it needs to say it
        import time

        time.sleep(1.0)


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line, `ssattn COMMAND: error: ... (see ssattn COMMAND --help)`, and
    exit 2, instead of the usage block (subcommand parsers inherit it)."""

    def error(self, message):
        # argparse lists choices as Python strings: (choose from 'unet', 'unet-ss') -> (choose from unet, unet-ss)
        message = re.sub(r"\(choose from (.*)\)$", lambda m: f"(choose from {m.group(1).replace(chr(39), '')})",
                         one_line(message))
        say_error(f"{self.prog}: error: {message} (see {self.prog} --help)")
        sys.exit(2)


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


def name_list(flag: str, text: str, known, unknown_is: str, expected: str) -> list[str]:
    """A comma-separated list of names from `known`, each once, in the order given (CLIError naming the flag
    otherwise: "--levels: dec9 {unknown_is}; {expected}", e.g. "is not a decoder stage", "give some of ...")."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise CLIError(f"{flag}: {', '.join(unknown) or repr(text)} {unknown_is}; {expected}")
    twice = sorted({v for v in names if names.count(v) > 1})
    if twice:
        raise CLIError(f"{flag}: {', '.join(twice)} is given twice")
    return names


def check_number(flag: str, value: float, *, positive: bool = False) -> None:
    """A finite number >= 0 (> 0 with positive), or CLIError naming the flag: a negative weight turns its loss
    term around, and nan or inf make every loss nan."""
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise CLIError(f"{flag} must be {'> 0' if positive else '>= 0'} and finite, got {value:g}")


def resolve_device(name: str):
    """--device as a torch.device that can run here (CLIError otherwise)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is usable here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def check_output_folder(flag: str, path) -> None:
    """Refuse, before any work, an output folder that cannot be made: a file, a path inside a file, or a place
    where no folder can be created (CLIError naming the flag). Leaves the file system as it found it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise CLIError(f"{flag} {path!r} is a file; it must name a folder (created if needed)")
    missing, above = [], os.path.abspath(path)
    while not os.path.exists(above):
        missing.append(above)
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise CLIError(f"{flag} {path!r}: {above!r} is a file, not a folder")
    try:  # the one sure test: make it (torchrun's ranks may race here, hence exist_ok), then take it away again
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{flag} {path!r}: cannot create this folder ({exc.strerror or exc})") from None
    for folder in missing:  # deepest first
        try:
            os.rmdir(folder)
        except OSError:
            pass


def add_progress_arg(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="show no progress (a bar on a terminal; otherwise a line per tenth of the work)")


# --------------------------------------------------------------------------- CPU threads
THREADS_HELP = ("CPU threads (default: OMP_NUM_THREADS when set, which torchrun sets to 1 per process; else the "
                "cores not busy with other work, from the load average, shared among this machine's processes)")


def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)


def auto_threads(processes: int = 1) -> int:
    """The cores not busy with other work (load average), shared by `processes` on this machine: all of them
    on an idle machine, fewer on a busy one (oversubscribed torch threads spin and can run several times
    slower than one thread)."""
    cores = os.cpu_count() or 1
    try:
        idle = cores - int(math.floor(os.getloadavg()[0] + 0.5))
    except OSError:
        idle = cores
    return max(1, min(cores, idle) // max(1, processes))


def use_threads(requested, device, who: str = "ssattn") -> int:
    """Set torch's CPU threads for a command (see THREADS_HELP) and return the count; one warning line when
    --threads asks for more than the machine's cores (who: the command, for the message)."""
    import torch

    if requested:
        threads = int(requested)
        processes, cores = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), os.cpu_count() or 1
        if threads * processes > cores and is_main_rank():
            each = f" in each of {processes} processes" if processes > 1 else ""
            print(f"{who}: warning: --threads {threads}{each} is more than the {cores} core(s) here; threads that "
                  f"outnumber the cores wait for each other and can run several times slower", file=sys.stderr)
    elif device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
    else:
        threads = auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads
