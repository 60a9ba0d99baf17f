"""Run a list of independent block computations locally or on a dask.distributed cluster.

``address`` None runs in-process; ``"local"`` starts a LocalCluster for the call; anything
else is a scheduler address (``tcp://host:8786``). The functions are plain module-level
callables (picklable), each reading its own block of the lake by URL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def map_blocks(fn: Callable[..., Any], args: Sequence[tuple], address: str | None = None,
               progress: bool = False) -> list[Any]:
    """``[fn(*a) for a in args]``, on dask workers when an address is given."""
    if address is None:
        it = args
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(args, unit="block")
        return [fn(*a) for a in it]
    from dask.distributed import Client, LocalCluster

    if address == "local":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            return client.gather(client.map(fn, *zip(*args), pure=False))
    with Client(address) as client:
        return client.gather(client.map(fn, *zip(*args), pure=False))
