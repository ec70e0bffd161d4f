"""Progress lines for long work (prepared cache, twin writer, fixture generator, reference steps).

One line on stderr (which the pipeline's rules send to their logs) at most every INTERVAL_S
seconds: what is done out of what, MB written and the rate, so nothing long stays silent.
Short jobs print nothing until INTERVAL_S has passed, then a final line."""

from __future__ import annotations

import sys
import time

INTERVAL_S = 5.0


class Progress:
    """`advance(n_bytes, what)` after each unit of work; `done()` at the end."""

    def __init__(self, task: str, total_bytes: int, *, unit: str = "MB", interval_s: float | None = None):
        self.task = task
        self.total = total_bytes
        self.unit = unit
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.done_bytes = 0
        self.items = 0
        self.t0 = time.monotonic()
        self._last = self.t0
        self.printed = False

    def _line(self, what: str) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        mb, total = self.done_bytes / 2**20, self.total / 2**20
        return (
            f"[{self.task}] {self.items} done ({what}): {mb:.0f}/{total:.0f} {self.unit}, "
            f"{mb / dt:.1f} {self.unit}/s, {dt:.1f} s"
        )

    def advance(self, n_bytes: int, what: str = "", *, item: bool = True) -> None:
        """`n_bytes` more done; `item=False` for a part of an item (a chunk of a big tensor)."""
        self.done_bytes += n_bytes
        self.items += int(item)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.printed = True
            print(self._line(what), file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.printed or time.monotonic() - self.t0 >= self.interval_s:
            print(self._line("finished"), file=sys.stderr, flush=True)
