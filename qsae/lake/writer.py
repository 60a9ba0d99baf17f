"""Writing finished shards in the background (the host side; no torch).

Shared by capture (question lake) and collection (token lake). The device-side conversion of
activations to the lake dtype is ``qsae.lm.convert.to_lake_dtype``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from qsae.lake.store import Lake


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
