"""Stopping long jobs at a safe point: a process-wide stop request that jobs check between units
of work (a batch, a shard), and a count of jobs still working, so a supervisor (the CLI, when
the Prefect server it runs against is gone) can stop them and know when nothing is half-done.

A job never stops inside a write: a shard's data is written and marked done, or not started.
Imports nothing heavy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from qsae.errors import QsaeError

_STOP = threading.Event()
_reason = ""
_active = 0
_cond = threading.Condition()


class Interrupted(QsaeError):
    """A job stopped at a safe point because a stop was requested (what it wrote is durable)."""


def request_stop(reason: str) -> None:
    """Ask every job in this process to stop at its next safe point."""
    global _reason
    _reason = reason
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def check(where: str = "") -> None:
    """Raise ``Interrupted`` if a stop was requested (call between units of work)."""
    if _STOP.is_set():
        raise Interrupted(f"stopped{' ' + where if where else ''}: {_reason}")


def reset() -> None:
    """Clear a stop request (tests, and a process that runs another job afterwards)."""
    _STOP.clear()


@contextmanager
def working() -> Iterator[None]:
    """Count this block as a job at work: ``wait_idle`` waits for every such block to end."""
    global _active
    with _cond:
        _active += 1
    try:
        yield
    finally:
        with _cond:
            _active -= 1
            _cond.notify_all()


def wait_idle(timeout: float) -> bool:
    """Wait until no job is at work (True), or ``timeout`` seconds (False)."""
    with _cond:
        return _cond.wait_for(lambda: _active == 0, timeout)
