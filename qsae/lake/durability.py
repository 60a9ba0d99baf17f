"""What makes a region's write durable, or say clearly why it is not: fsync of its files, zarr's
async writes bounded by a timeout, a store's failures mapped to one line a user can act on, and
the hooks the fault tests run between a region's data and its done flag."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from zarr.core.sync import sync as zarr_sync

from qsae.errors import StoreFullError, StoreUnreachableError


class RegionHooks:
    """Callables run between a region's data and its done flag, with the store's URL and the
    region: empty in normal use. Tests install fault injection here (``tests/fault_inject.py``:
    pause there so a process or the storage can be killed, or raise once) instead of the
    durability path parsing an environment variable."""

    def __init__(self) -> None:
        self._hooks: list[Callable[[str, slice], None]] = []

    def install(self, hook: Callable[[str, slice], None]) -> Callable[[], None]:
        """Add ``hook``; returns the function that removes it again."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def __call__(self, url: str, region: slice) -> None:
        for hook in list(self._hooks):
            hook(url, region)


BEFORE_DONE = RegionHooks()


@functools.lru_cache(maxsize=1)
def _fsync_pool() -> ThreadPoolExecutor:
    """The threads that fsync a region's files in parallel, made on first use (not at import)."""
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="qsae-fsync")


def _fsync(path) -> None:
    """fsync one file if it exists."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_timeout() -> float:
    """Seconds a region write may take before the store counts as unreachable."""
    return float(os.environ.get("QSAE_WRITE_TIMEOUT_S", "300"))


def _run_concurrently(coroutines, what: str = "") -> None:
    """Run zarr async writes together on zarr's own event loop (overlaps per-array overhead).

    Bounded by ``write_timeout()``: an object store that stops answering (an S3 PUT waiting
    for "100 Continue" is not covered by botocore's read timeout) fails the write clearly
    instead of hanging the worker.
    """
    timeout = write_timeout()

    async def gather():
        await asyncio.wait_for(asyncio.gather(*coroutines), timeout)

    try:
        zarr_sync(gather())
    except (asyncio.TimeoutError, TimeoutError):
        raise StoreUnreachableError(
            f"writing {what} timed out after {timeout:g} s: the store stopped answering "
            "(set QSAE_WRITE_TIMEOUT_S to wait longer); the region is not marked done and a rerun rewrites it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - typed below, re-raised as it was when it is not the store's
        raise _store_error(exc, f"writing {what}") from None


def _store_error(exc: BaseException, doing: str,
                 after: str = "the region is not marked done; free space and rerun (done regions are kept)"
                 ) -> BaseException:
    """A store's failure as one line a user can act on: a full disk, an unreachable endpoint or
    bucket; anything else unchanged."""
    import errno

    msg = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in msg):
        return StoreFullError(f"out of disk space {doing}: {after}")
    module = type(exc).__module__.split(".")[0]
    if module in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs") or isinstance(
            exc, (ConnectionError, FileNotFoundError)):
        hint = " (does the bucket exist?)" if "NoSuchBucket" in repr(exc) or "bucket" in msg.lower() else ""
        return StoreUnreachableError(f"{doing} failed, the store is unreachable{hint}: {type(exc).__name__}: {msg}; "
                                     "the region is not marked done and a rerun rewrites it")
    return exc
