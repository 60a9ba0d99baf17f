"""Is every stored object a done region needs present, non-empty and decodable?

Zarr reads a missing chunk (or shard) as its fill value, so a lake that lost a file still
opens and the analyses silently compute other numbers. Each array's objects are known from
its chunk grid: every object that intersects a done question (and every object of an array
without a question dimension) must exist. One listing of the store answers presence and size
(cheap enough to run whenever an analysis opens a lake); ``decode=True`` also reads each
object (crc32c checksums, written with the data since they were added, catch flipped bits).

Imports numpy/zarr only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Damage:
    """One stored object a done region needs that is missing, empty or unreadable."""

    array: str
    key: str  # the object's key inside the array (e.g. "c/0/3/0/0")
    units: tuple[int, int] | None  # the question (or token) index range it holds, [start, stop)
    what: str
    questions: tuple[int, int] | None = None  # the first and last question ids of that range

    def __str__(self) -> str:
        where = ""
        if self.units is not None:
            ids = f" (ids {self.questions[0]}..{self.questions[1]})" if self.questions else ""
            where = f", questions {self.units[0]}..{self.units[1] - 1}{ids}"
        return f"{self.array}/{self.key}{where}: {self.what}"


def _outer(arr) -> tuple[int, ...]:
    """The shape of one stored object: the shard when the array is sharded, else the chunk."""
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards is not None else tuple(arr.chunks)


def list_objects(lake) -> dict[str, int]:
    """Every object under the store's root with its size in bytes (one listing)."""
    fs, root = lake.ref.fs()
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    out = {}
    for path, info in found.items():
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        out[rel] = int(info.get("size") or 0)
    return out


def required_objects(lake, mask: np.ndarray, names: list[str] | None = None):
    """(array name, zarr array, object key, unit range or None, index) of every object that
    holds a unit selected by ``mask`` (for the done mask: every object a done region needs;
    the coordinate arrays, which have no unit dimension, always). ``names`` restricts the
    arrays (coordinates then left out). Only the selected objects are enumerated."""
    unit = lake.schema.unit
    arrays = dict(lake.arrays) if names is None else {n: lake.arrays[n] for n in names}
    if names is None:
        for name in lake.schema.coords:
            if name in lake.group.array_keys():
                arrays[name] = lake.group[name]
    for name, arr in arrays.items():
        dims = tuple(arr.metadata.dimension_names or ())
        outer = _outer(arr)
        grid = [max(1, math.ceil(s / c)) for s, c in zip(arr.shape, outer)]
        axis = dims.index(unit) if unit in dims else None
        if axis is not None:  # only the chunk rows along the unit axis that hold a selected unit
            step = outer[axis]
            rows = np.unique(np.flatnonzero(mask) // step)
            grid[axis] = 1
        for coords in np.ndindex(*grid):
            for row in (rows if axis is not None else [None]):
                c = list(coords)
                units = None
                if axis is not None:
                    c[axis] = int(row)
                    units = (int(row) * step, min((int(row) + 1) * step, arr.shape[axis]))
                index = tuple(slice(i * o, min((i + 1) * o, n)) for i, o, n in zip(c, outer, arr.shape))
                yield name, arr, arr.metadata.encode_chunk_key(tuple(c)), units, index


def find_damage(lake, decode: bool = False, limit: int | None = None,
                objects: dict[str, int] | None = None, done: np.ndarray | None = None) -> list[Damage]:
    """Objects that done regions need and that are missing, empty or (with ``decode``) do not
    decode; ``limit`` stops after that many. A missing object counts only in lakes that store
    every chunk (attribute ``stores_every_chunk``); older ones skipped all-fill chunks."""
    objects = list_objects(lake) if objects is None else objects
    every = bool(lake.attrs.get("stores_every_chunk"))  # older lakes skipped all-fill chunks
    done = lake.done_mask() if done is None else done
    qids = np.asarray(lake.group[lake.schema.unit][:]) if lake.schema.unit in lake.group.array_keys() else None
    out: list[Damage] = []
    for name, arr, key, units, index in required_objects(lake, done):
        size = objects.get(f"{name}/{key}")
        what = None
        if size is None:
            if every:
                what = "missing (zarr would read it as fill values)"
        elif size == 0:
            what = "empty (0 bytes)"
        elif decode:
            try:
                arr[index]
            except Exception as exc:  # noqa: BLE001 - any decoding failure is damage to report, not a crash
                first = str(exc).splitlines()[0] if str(exc) else ""
                what = f"does not decode ({type(exc).__name__}: {first[:160]})"
        if what:
            ids = (int(qids[units[0]]), int(qids[units[1] - 1])) if (qids is not None and units) else None
            out.append(Damage(name, key, units, what, ids))
            if limit is not None and len(out) >= limit:
                break
    return out


def undone_with_data(lake, objects: dict[str, int] | None = None, done: np.ndarray | None = None) -> list[int]:
    """Shards not marked done whose every data object is present: an interrupted write (the
    next capture rewrites them) or a lost ``done`` object."""
    done = lake.done_mask() if done is None else done
    if not lake.attrs.get("stores_every_chunk") or done.all():
        return []
    objects = list_objects(lake) if objects is None else objects
    shard = lake.layout.shard
    complete: dict[int, bool] = {}
    data = [n for n in lake.arrays if n != "done"]
    for name, _arr, key, units, _index in required_objects(lake, ~done, names=data):
        if units is not None:
            k = units[0] // shard
            complete[k] = complete.get(k, True) and f"{name}/{key}" in objects
    return sorted(k for k, ok in complete.items() if ok and not done[lake.shard_region(k)].all())
