"""Progress for long jobs: a live bar on a terminal, a few plain lines in a log.

tqdm redraws its bar with carriage returns; written to a file or a CI log
each redraw becomes a line, thousands per run. So a bar is drawn only when
the stream is a terminal; otherwise one line is written per tenth of the
work (and at the end), with the same counts and postfix.
"""

from __future__ import annotations

import sys
import time


class _Silent:
    """Progress that shows nothing (disabled, or not the main process)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


class _LogLines:
    """One line per tenth of the work, for streams that are not terminals."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, stream):
        self.total, self.n, self.desc, self.unit, self.stream = total, initial, desc, unit, stream
        self.postfix = ""
        self.start = time.monotonic()
        self.next_tenth = self._tenth(initial) + 1
        self.closed = False

    def _tenth(self, n: int) -> int:
        return (10 * n) // self.total if self.total > 0 else 10

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        pct = 100 * self.n // self.total if self.total > 0 else 100
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct}%) in {elapsed:.0f} s{tail}",
              file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenth(self.n) >= self.next_tenth:
            self.next_tenth = self._tenth(self.n) + 1
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        # The end is always reported, even when the last update fell inside a tenth already shown.
        if not self.closed and self.next_tenth <= 10:
            self._line()
        self.closed = True


def progress_bar(total: int, *, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 stream=None):
    """A progress object with tqdm's update / set_postfix / close.

    A tqdm bar when `stream` (default stderr) is a terminal and tqdm is
    installed; otherwise a line per tenth of `total`; nothing when `disable`.
    """
    if disable:
        return _Silent()
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return _LogLines(total, initial, desc, unit, stream)
