"""Progress that suits where it goes: a tqdm bar on a terminal, plain lines everywhere else.

A bar redraws itself with carriage returns, which a CI log, `nohup` or a pipe keeps as
thousands of frames on one line. When the stream is not a terminal, `progress_bar` returns a
`LineProgress` instead: one line every 10% or 30 seconds, whichever comes first, and one at
the end, with the same counts, rate and extra fields the bar would show.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def progress_bar(total: int, *, desc: str, unit: str, enabled: bool = True, leave: bool = True,
                 unit_scale: bool = False, stream: Optional[TextIO] = None):
    """A progress display with tqdm's interface (update, set_postfix, write, close, `with`).

    Arguments:
      total: the count at 100%; desc: what is counted; unit: its unit.
      enabled: False shows nothing.
      leave: keep the finished bar on the terminal.
      unit_scale: show counts as 1.2M rather than 1234567 (bytes).
      stream: where it goes (default: stderr).
    """
    from tqdm import tqdm

    stream = stream or sys.stderr
    if enabled and not _is_terminal(stream):
        return LineProgress(total, desc=desc, unit=unit, stream=stream, unit_scale=unit_scale)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, dynamic_ncols=True,
                unit_scale=unit_scale, file=stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """Progress as plain lines: `embed: 40/100 img (40%), 2.1 img/s, failed=0`.

    Arguments:
      total: the count at 100%; desc: what is counted; unit: its unit.
      every_fraction, every_seconds: print when either much more is done, or time has passed.
    """

    def __init__(self, total: int, *, desc: str, unit: str, stream: TextIO, unit_scale: bool = False,
                 every_fraction: float = 0.1, every_seconds: float = 30.0):
        self.total, self.desc, self.unit, self.stream, self.unit_scale = total, desc, unit, stream, unit_scale
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.n, self.postfix = 0, ""
        self.started = self.last_time = time.time()
        self.last_n, self.closed = 0, False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        step = max(1, round(self.total * self.every_fraction)) if self.total else 0
        if (step and self.n - self.last_n >= step) or now - self.last_time >= self.every_seconds:
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._print(time.time())
        self.closed = True

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self.started, 1e-9)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self._count(self.n)}/{self._count(self.total)} {self.unit}{share}, "
              f"{self._count(rate, 2)} {self.unit}/s{extra}", file=self.stream, flush=True)
        self.last_n, self.last_time = self.n, now

    def _count(self, value: float, digits: int = 0) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(value)
        return f"{value:.{digits}f}"
