"""Fault injection for the fault tests, installed as a ``qsae.lake.store.BEFORE_DONE`` hook:
it runs after a region's data is written and before its done flag is set.

``python -m tests.fault_inject SPEC -- <qsae CLI args>`` runs the CLI in this process with the
hook installed (how the tests inject into a subprocess they then kill). SPEC is
``pause:<marker>[:<skip>[:<seconds>]]`` (append a line to <marker> per region; after the
first <skip> regions sleep <seconds>, default 120, so the test can kill the process or the
storage) or ``raise-once:<marker>`` (raise OSError the first time, creating <marker>).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager


def pause(marker: str, skip: int = 0, seconds: float = 120.0) -> Callable[[str, slice], None]:
    def hook(url: str, region: slice) -> None:
        with open(marker, "a") as f:
            f.write(f"{region.start}:{region.stop}\n")
        with open(marker) as f:
            seen = len(f.read().splitlines())
        if seen > skip:
            time.sleep(seconds)

    return hook


def raise_once(marker: str) -> Callable[[str, slice], None]:
    def hook(url: str, region: slice) -> None:
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"{region.start}:{region.stop}\n")
            raise OSError(f"injected fault after writing region {region.start}:{region.stop} (before done)")

    return hook


@contextmanager
def oom_above_rows(model, rows: int):
    """The first forward pass over more than ``rows`` batch rows raises a device out-of-memory
    error (as CUDA would), once; yields {"count", "error"}."""
    import torch

    raised: dict = {"count": 0, "error": None}

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > rows and raised["count"] == 0:
            raised["count"] += 1
            raised["error"] = torch.OutOfMemoryError(f"injected: CUDA out of memory at {ids.shape[0]} rows")
            raise raised["error"]

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield raised
    finally:
        handle.remove()


@contextmanager
def record_batch_widths(model):
    """Records the prompt width of every prefill (a forward over more than one token)."""
    widths: list[int] = []

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            widths.append(int(ids.shape[1]))

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield widths
    finally:
        handle.remove()


def from_spec(spec: str) -> Callable[[str, slice], None]:
    action, _, rest = spec.partition(":")
    if action == "pause":
        marker, *more = rest.split(":")
        return pause(marker, int(more[0]) if more else 0, float(more[1]) if len(more) > 1 else 120.0)
    if action == "raise-once":
        return raise_once(rest)
    raise ValueError(f"unknown fault spec {spec!r}")


def main(argv: list[str]) -> None:
    spec, sep, *args = argv
    assert sep == "--", "usage: python -m tests.fault_inject SPEC -- <qsae args>"
    from flows.cli import main as qsae_main
    from qsae.lake.store import BEFORE_DONE

    BEFORE_DONE.install(from_spec(spec))
    qsae_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
