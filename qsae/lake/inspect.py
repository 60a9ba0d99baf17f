"""A readable summary of a store (``qsae inspect``): dims, variables with dtypes and on-disk
sizes, chunk/shard layout, done fraction, lineage and the result groups present."""

from __future__ import annotations

import json
from typing import Any

from qsae.lake.results import result_groups
from qsae.lake.storage import StoreRef
from qsae.lake.store import Lake

LINEAGE = ("model", "model_revision", "model_path", "hook", "sae_source", "d_sae", "k", "dataset", "dataset_revision",
           "sampling", "seed", "prompt_template", "resid_dtype", "schema_version", "qsae_version", "created")


def _sizes_on_disk(ref: StoreRef) -> dict[str, int]:
    """Bytes stored under each top-level name of the store."""
    fs, root = ref.fs()
    sizes: dict[str, int] = {}
    for name, info in fs.find(root, detail=True).items():
        rel = name[len(root.rstrip("/")) + 1:]
        top = rel.split("/", 1)[0]
        sizes[top] = sizes.get(top, 0) + int(info.get("size", 0))
    return sizes


ATTR_CHARS = 2_000  # an attribute longer than this (as JSON) is cut unless --full


def _cut(value: Any, full: bool) -> Any:
    """An attribute as inspect shows it: whole with ``full``, else its first ATTR_CHARS
    characters (as JSON) and how long it is (a 50 MB attribute once came out whole)."""
    if full:
        return value
    text = json.dumps(value, default=str)
    if len(text) <= ATTR_CHARS:
        return value
    return f"{text[:ATTR_CHARS]}... ({len(text):,} characters; --full prints them)"


def inspect_store(target: str | StoreRef, storage_options: dict | None = None, full: bool = False) -> dict[str, Any]:
    """Everything ``qsae inspect`` prints, as a JSON-able dict (long attributes cut unless ``full``)."""
    ref = StoreRef.of(target, storage_options)
    url = ref.url
    lake = Lake.open(ref)
    disk = _sizes_on_disk(ref)
    variables = {}
    for name, arr in lake.group.arrays():
        shards = getattr(arr, "shards", None)
        variables[name] = {
            "dims": list(arr.metadata.dimension_names or ()), "shape": list(arr.shape), "dtype": str(arr.dtype),
            "chunks": list(arr.chunks), "shards": list(shards) if shards else None,
            "bytes_on_disk": disk.get(name, 0), "bytes_uncompressed": int(arr.nbytes) if arr.dtype.kind not in "TO" else None,
        }
    done = lake.done_mask()
    attrs = lake.attrs
    return {
        "store": url,
        "kind": attrs["kind"],
        "dims": dict(attrs["config"]["sizes"]),
        "done": int(done.sum()), "units": int(done.size), "done_fraction": float(done.mean()),
        "shards": {"size": lake.layout.shard, "chunk": lake.layout.chunk, "total": lake.n_shards,
                   "pending": len(lake.pending_shards())},
        "bytes_on_disk": sum(disk.values()),
        "variables": variables,
        "lineage": {k: _cut(attrs[k], full) for k in LINEAGE if k in attrs},
        "result_groups": result_groups(lake.group),
    }


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['store']}  ({info['kind']} lake, {_human(info['bytes_on_disk'])} on disk)",
             "dims: " + ", ".join(f"{k}={v}" for k, v in info["dims"].items()),
             f"done: {info['done']} / {info['units']} ({100 * info['done_fraction']:.1f}%), shards of "
             f"{info['shards']['size']} (inner chunks {info['shards']['chunk']}): {info['shards']['pending']} of "
             f"{info['shards']['total']} pending", "", "variables:"]
    for name, v in sorted(info["variables"].items()):
        layout = f"chunks {tuple(v['chunks'])}" + (f" in shards {tuple(v['shards'])}" if v["shards"] else "")
        lines.append(f"  {name:24s} {str(tuple(v['dims'])):40s} {v['dtype']:10s} {_human(v['bytes_on_disk']):>9s}  {layout}")
    lines += ["", "lineage:"] + [f"  {k}: {json.dumps(v)}" for k, v in info["lineage"].items()]
    lines += ["", "result groups: " + (", ".join(info["result_groups"]) or "none")]
    return "\n".join(lines)
