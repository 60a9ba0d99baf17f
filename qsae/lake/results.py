"""Result groups and figures written beside the data, inside the lake's store.

A study writes an xarray Dataset as a zarr group of the store (``rivalry/layer_20/paper``,
``reconstruction/...``) with its parameters and the lake's lineage as attributes, and its
figures as PNG files beside the store (``<store>.figures/<group>/figure.png``), reachable by
the same URL scheme as the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from qsae.errors import NothingCapturedError, ResultDamagedError, ResultMissingError, StaleResultError
from qsae.lake.lineage import Lineage
from qsae.lake.storage import StoreRef
from qsae.lake.store import consolidate


def lineage_of(attrs: dict[str, Any]) -> dict[str, Any]:
    """The lake lineage a result records (so a result names the data it came from)."""
    return Lineage.of(attrs).record()


def jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays, paths; NaN and inf as null), keys as strings:
    what result attributes and every result's JSON are made of."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


@dataclass(frozen=True)
class LakeState:
    """The state of the lake a result was computed from: how many of its units (questions) were
    captured, exactly which (a digest of the done mask), and the lake's identity (a digest of its
    config and lineage). A reader compares it with the lake as it is now: a result computed on a
    half-captured lake, or on another lake at the same URL, is stale."""

    n_done: int
    n_units: int
    unit: str
    done_digest: str
    identity: str

    @classmethod
    def of(cls, attrs: dict[str, Any], done: np.ndarray, unit: str = "question") -> LakeState:
        done = np.asarray(done, bool)
        ident = {"config": attrs.get("config"), "lineage": Lineage.of(attrs).record()}
        return cls(int(done.sum()), int(done.size), unit, hashlib.sha256(np.packbits(done).tobytes()).hexdigest()[:16]
                   + f"-{done.size}", hashlib.sha256(json.dumps(jsonable(ident), sort_keys=True).encode()).hexdigest()[:16])

    @property
    def partial(self) -> bool:
        return self.n_done < self.n_units

    def line(self) -> str:
        """What a reader of a result must know about coverage ('' when every unit was captured)."""
        if not self.partial:
            return ""
        return f"{self.n_done:,} of {self.n_units:,} {self.unit}s captured; the rest are not in this result"

    def require(self, url: str, what: str) -> LakeState:
        """NothingCapturedError when no unit is done (a capture seconds in, or a lost ``done``)."""
        if self.n_done == 0:
            raise NothingCapturedError(f"{url} holds no captured {self.unit} yet (0 of {self.n_units:,} done): "
                                       f"nothing to {what}; run or resume the capture first")
        return self

    def record(self) -> dict[str, Any]:
        return {"n_done": self.n_done, "n_units": self.n_units, "unit": self.unit, "done_digest": self.done_digest,
                "identity": self.identity}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> LakeState:
        return cls(int(rec["n_done"]), int(rec["n_units"]), str(rec.get("unit", "question")), str(rec["done_digest"]),
                   str(rec["identity"]))

    def stale_reason(self, now: LakeState) -> str | None:
        """Why a result computed at this state does not describe the lake ``now`` (None: it does)."""
        if self.identity != now.identity:
            return "it was computed from another lake (config or lineage differ) at this URL"
        if self.done_digest != now.done_digest:
            return (f"it was computed when {self.n_done:,} of {self.n_units:,} {self.unit}s were captured; the lake "
                    f"now has {now.n_done:,}")
        return None


def lake_state(ds_or_lake: Any) -> LakeState:
    """The state of a lake (an open ``Lake`` or its xarray Dataset)."""
    if isinstance(ds_or_lake, xr.Dataset):
        unit = "token" if "token" in ds_or_lake.dims and "question" not in ds_or_lake.dims else "question"
        return LakeState.of(dict(ds_or_lake.attrs), ds_or_lake["done"].values, unit)
    return LakeState.of(dict(ds_or_lake.attrs), ds_or_lake.done_mask(), ds_or_lake.schema.unit)


def write_result_group(ref: StoreRef, group: str, ds: xr.Dataset, attrs: dict[str, Any],
                       state: LakeState | None = None) -> str:
    """(Over)write a result group in the store, proving itself as the lake does: every chunk
    stored and crc32c-checksummed, and (with ``state``) the lake state it was computed from in
    its attributes. Returns ``url#group``."""
    ds = ds.copy()
    ds.attrs = jsonable({**attrs, **({"lake_state": state.record()} if state is not None else {})})
    encoding = {}
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":  # fixed-width UTF-32 has no zarr v3 spec: store variable-length
            ds[name] = var.astype(object)
        encoding[name] = {"compressors": [ZstdCodec(level=3), Crc32cCodec()]}
    path, opts = ref.xarray_target()
    ds.to_zarr(path, group=group, mode="w", storage_options=opts or None, zarr_format=3, consolidated=False,
               encoding=encoding, write_empty_chunks=True)
    consolidate(ref)
    return f"{ref.url}#{group}"


def result_groups(group: zarr.Group, prefix: str = "") -> list[str]:
    """The paths of the result groups under a store's root (groups holding arrays)."""
    out = []
    for name, child in group.groups():
        path = f"{prefix}{name}"
        if any(True for _ in child.arrays()):
            out.append(path)
        out += result_groups(child, path + "/")
    return out


def result_damage(ref: StoreRef, group: str, objects: dict[str, int] | None = None) -> list[str]:
    """Every chunk object of the group's arrays that is missing or empty (one listing)."""
    if objects is None:
        fs, root = (ref / group).fs()
        root = root.rstrip("/")
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            found = {}
        objects = {p[len(root):].lstrip("/"): int(i.get("size") or 0) for p, i in found.items() if p.startswith(root)}
    grp = zarr.open_group(store=(ref / group).zarr_store(read_only=True), mode="r", zarr_format=3,
                          use_consolidated=False)
    bad = []
    for name, arr in grp.arrays():
        sep = "/"
        shape, chunks = arr.shape, (arr.shards or arr.chunks)
        grid = [max(1, math.ceil(s / c)) for s, c in zip(shape, chunks)] if shape else []
        for coords in np.ndindex(*grid) if grid else [()]:
            key = f"{name}/c" + ("".join(f"{sep}{c}" for c in coords) if coords else "")
            if objects.get(key, 0) == 0:
                bad.append(f"{key}: {'empty' if key in objects else 'missing'}")
    return bad


def read_result_group(ref: StoreRef, group: str, now: LakeState | None = None, rerun: str = "") -> xr.Dataset:
    """A result group, proven: it exists (whatever the consolidated metadata says), every chunk is
    there, and it was computed from the lake as it is ``now`` (when given). Otherwise a one-line
    ``ResultError`` (``ResultMissingError``, ``ResultDamagedError``, ``StaleResultError``) naming
    what is wrong and, with ``rerun``, the command that makes it again."""
    hint = f": rerun `{rerun}`" if rerun else ""
    try:
        grp = zarr.open_group(store=(ref / group).zarr_store(read_only=True), mode="r", zarr_format=3,
                              use_consolidated=False)
        attrs = dict(grp.attrs)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise ResultMissingError(f"{ref.url} has no result group {group!r}{hint}") from None
    damage = result_damage(ref, group)
    if damage:
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        raise ResultDamagedError(f"result group {group!r} of {ref.url} is damaged: {damage[0]}{more}{hint}")
    if now is not None:
        rec = attrs.get("lake_state")
        if rec is None:
            raise StaleResultError(f"result group {group!r} of {ref.url} records no lake state (written by an older "
                                   f"qsae): it cannot be checked against the lake{hint}")
        why = LakeState.from_record(rec).stale_reason(now)
        if why:
            raise StaleResultError(f"result group {group!r} of {ref.url} is stale: {why}{hint}")
    path, opts = ref.xarray_target()
    return xr.open_zarr(path, group=group, storage_options=opts or None, consolidated=False)


def figure_png(fig) -> bytes:
    """A matplotlib figure rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def save_png(png: bytes, ref: StoreRef, key: str) -> str:
    """Write PNG bytes at ``<store>.figures/<key>``; returns where they went."""
    dest = ref.figures / key
    fs, path = dest.fs()
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(png)
    return dest.url


def save_figure(fig, ref: StoreRef, key: str) -> str:
    """Save a matplotlib figure as PNG at ``<store>.figures/<key>``; returns where it went."""
    return save_png(figure_png(fig), ref, key)


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(jsonable(summary), indent=1, sort_keys=True)
