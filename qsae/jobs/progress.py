"""How far a long step is, with an estimate of the time left, wherever it runs.

On a terminal a tqdm bar; in a Prefect run (or any non-interactive run) an INFO line on the
job's logger at most every ``QSAE_PROGRESS_SECONDS`` (default 15 s) and at the end: the flow
run's logs then show "capture: 24 of 64 questions (38%), 1 min 40 s elapsed, about 2 min 45 s
left" instead of one line per shard minutes apart.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from types import TracebackType

DEFAULT_EVERY_S = 15.0


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 10 s``, ``1 h 05 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class Progress:
    """Counts units of a step of known size; a bar (``bar=True``) or rate-limited log lines with an ETA."""

    def __init__(self, total: int, desc: str, unit: str, *, bar: bool, logger: logging.Logger,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic, initial: int = 0):
        self.total, self.desc, self.unit, self.logger, self.clock = int(total), desc, unit, logger, clock
        self.every = float(os.environ.get("QSAE_PROGRESS_SECONDS", DEFAULT_EVERY_S)) if every is None else every
        self.done = self.start_done = int(initial)
        self.t0 = self.last = clock()
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self.logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: done of total unit (pct), elapsed, about ETA left`` (the rate of this run so far)."""
        elapsed = (self.clock() if now is None else now) - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done:,} of {self.total:,} {self.unit} ({pct:.0f}%), {duration(elapsed)} elapsed"
        made = self.done - self.start_done
        if self.done >= self.total:
            return text + ", done"
        if made > 0 and elapsed > 0:
            return text + f", about {duration(elapsed / made * (self.total - self.done))} left"
        return text

    def set_postfix(self, **kw: object) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
