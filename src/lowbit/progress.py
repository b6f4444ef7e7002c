"""Progress bars that suit where the output goes: tqdm's bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns, which a log file keeps as one long garbled line per
bar; when stderr is not a terminal the same bar is written as a complete line at most every
`LOG_INTERVAL` seconds (and at the end).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines in a log


class _Lines:
    """A file for tqdm that turns redraws into whole lines, one per interval at most."""

    def __init__(self, stream) -> None:
        self.stream, self.last, self.pending, self.written = stream, 0.0, "", ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if not text:
            return
        self.pending = text
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL:
            self.flush_line(now)

    def flush_line(self, now: float | None = None) -> None:
        if self.pending and self.pending != self.written:  # the final state is not repeated by close()
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.written = self.pending
        self.pending = ""
        self.last = time.monotonic() if now is None else now

    def flush(self) -> None:
        pass


class _LoggedBar(tqdm):
    def close(self) -> None:
        if not self.disable and not getattr(self, "_closed_line", False):
            self._closed_line = True
            self.refresh()
            self.fp.flush_line()
        super().close()


def progress_bar(iterable=None, *, desc: str = "", disable: bool = False, **kwargs):
    """A tqdm bar over `iterable` (or with `total=`), as plain lines when stderr is not a terminal."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, disable=disable, **kwargs)
    kwargs.setdefault("leave", True)
    return _LoggedBar(iterable, desc=desc, file=_Lines(sys.stderr), ascii=True, dynamic_ncols=False, ncols=100, **kwargs)
