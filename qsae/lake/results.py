"""Result groups and figures written beside the data, inside the lake's store.

A study writes an xarray Dataset as a zarr group of the store (``rivalry/layer_20/paper``,
``reconstruction/...``) with its parameters and the lake's lineage as attributes, and its
figures as PNG files beside the store (``<store>.figures/<group>/figure.png``), reachable by
the same URL scheme as the store.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import xarray as xr

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


def write_result_group(ref: StoreRef, group: str, ds: xr.Dataset, attrs: dict[str, Any]) -> str:
    """(Over)write a result group in the store; returns ``url#group``."""
    ds = ds.copy()
    ds.attrs = jsonable(attrs)
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":  # fixed-width UTF-32 has no zarr v3 spec: store variable-length
            ds[name] = var.astype(object)
    path, opts = ref.xarray_target()
    ds.to_zarr(path, group=group, mode="w", storage_options=opts or None, zarr_format=3, consolidated=False)
    consolidate(ref)
    return f"{ref.url}#{group}"


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
