"""Turning device tensors into lake arrays, and writing finished shards in the background.

Shared by capture (question lake) and collection (token lake).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .lake import Lake
from .schema import FP16_MAX


def to_lake_dtype(x: torch.Tensor, resid_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored, norm, overflow count, non-finite count) of rows of x, computed on x's device.

    float16 cannot hold |x| > 65504: such values are clipped to +-65504 and counted per row,
    never turned into inf. Non-finite values the model produced are kept and counted.
    """
    xf = x.float()
    finite = torch.isfinite(xf)
    nonfinite = (~finite).sum(-1)
    norm = torch.linalg.vector_norm(torch.where(finite, xf, 0.0), dim=-1)
    norm = torch.where(nonfinite > 0, torch.full_like(norm, float("nan")), norm)
    if resid_dtype == "float16":
        over = finite & (xf.abs() > FP16_MAX)
        stored = torch.where(over, xf.clamp(-FP16_MAX, FP16_MAX), xf).to(torch.float16)
        return stored, norm, over.sum(-1), nonfinite
    return xf, norm, torch.zeros_like(nonfinite), nonfinite


class ShardWriter:
    """A background thread writing finished shards; at most ``max_pending`` wait in memory.

    A write error is re-raised in the producer on its next ``submit`` or on ``close``.
    """

    def __init__(self, lake: Lake, max_pending: int = 2):
        self.lake = lake
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="qsae-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain so the producer never blocks on a dead writer
            shard, data = item
            try:
                t = time.perf_counter()
                self.lake.write_shard(shard, data)
                self.write_seconds += time.perf_counter() - t
                self.bytes_written += sum(v.nbytes for v in data.values() if v.dtype.kind not in "OUT")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                self.error = exc

    def _raise(self) -> None:
        """Re-raise the writer's own exception (its type is what callers and retries act on)."""
        if self.error is not None:
            err = self.error
            if not any("background shard writer" in n for n in getattr(err, "__notes__", [])):
                err.add_note("raised in qsae's background shard writer; the shard is not marked done")
            raise err

    def submit(self, shard: int, data: dict[str, np.ndarray]) -> None:
        self._raise()
        self.queue.put((shard, data))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()


@contextmanager
def background_writer(lake: Lake, max_pending: int = 2) -> Iterator[ShardWriter]:
    """A ``ShardWriter`` that is drained and joined when the block ends (errors re-raised)."""
    writer = ShardWriter(lake, max_pending)
    try:
        yield writer
    finally:
        writer.close()
