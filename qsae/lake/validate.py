"""A store checked against its schema before anything reads it: version, kind, lineage
attributes, coordinates, and every variable's dims, shape and dtype."""

from __future__ import annotations

import numpy as np
import zarr

from qsae.errors import IncompleteStoreError, NewerSchemaError, SchemaError
from qsae.lake.schema import (
    DATASET_ID,
    MAX_SIZES,
    QUESTION,
    QUESTION_SCHEMA,
    SCHEMA_VERSION,
    SCHEMAS,
    LakeSchema,
    resolve_dtype,
)
from qsae.version import __version__

CREATING = "creating"  # the root attribute of a store whose creation has not finished


def validate_group(group: zarr.Group, url: str = "", expect: LakeSchema | None = None) -> None:
    """Check a zarr group against its schema; raise SchemaError naming what is wrong."""
    attrs = dict(group.attrs)
    if CREATING in attrs:
        raise IncompleteStoreError(
            f"{url} is being created, or its creation was interrupted: a capture with the same config re-creates "
            "it (nothing was done in it yet)")
    version = attrs.get("schema_version")
    if version is None:
        raise IncompleteStoreError(
            f"{url} is not a qsae lake: no schema_version attribute (an interrupted creation leaves this; a capture "
            "with the same config re-creates it when nothing was done in it)")
    if int(version) > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{url} was written with lake schema version {version}; this qsae "
            f"({__version__}) reads versions up to {SCHEMA_VERSION}. Upgrade qsae to read it."
        )
    schema = SCHEMAS.get(attrs.get("kind"))
    if schema is None or (expect is not None and schema is not expect):
        want = expect.kind if expect is not None else "|".join(SCHEMAS)
        raise SchemaError(f"{url} is a {attrs.get('kind')!r} store, not a {want} lake")
    missing = [a for a in schema.required_attrs if a not in attrs]
    if missing:
        raise SchemaError(f"{url} lacks lineage attributes {missing}")
    names = set(group.array_keys())
    for coord in schema.coords:
        if coord not in names:
            raise SchemaError(f"{url} lacks the coordinate array {coord!r}")
    sizes = _sane_sizes(attrs, url)
    for coord in schema.coords:  # coordinates are read whole: sized first
        shape = tuple(group[coord].shape)
        if coord in sizes and shape != (sizes[coord],):
            raise SchemaError(f"{url}: the coordinate array {coord!r} has shape {shape}, the config says "
                              f"{coord}={sizes[coord]:,}")
    if schema is QUESTION_SCHEMA and DATASET_ID.name in names:  # optional: only for non-integer dataset ids
        arr = group[DATASET_ID.name]
        if tuple(arr.metadata.dimension_names or ()) != DATASET_ID.dims or arr.dtype.kind not in "TUO":
            raise SchemaError(f"{url}: {DATASET_ID.name} must be strings along {DATASET_ID.dims}")
    for var in schema.variables_for(attrs.get("d_sae") is not None):
        if var.optional and var.name not in names:
            continue
        if var.name not in names:
            raise SchemaError(f"{url} lacks the variable {var.name!r} {var.dims}")
        arr = group[var.name]
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != var.dims:
            raise SchemaError(f"{url}: {var.name} has dims {dims}, the schema says {var.dims}")
        want_shape = tuple(sizes[d] for d in var.dims)
        if arr.shape != want_shape:
            raise SchemaError(f"{url}: {var.name} has shape {arr.shape}, expected {want_shape}")
        want = resolve_dtype(var, attrs["resid_dtype"], attrs.get("d_sae"))
        got = arr.dtype
        if want == "str":
            if got.kind not in ("T", "U", "O"):
                raise SchemaError(f"{url}: {var.name} has dtype {got}, expected strings")
        elif np.dtype(got) != want:
            raise SchemaError(f"{url}: {var.name} has dtype {got}, expected {want}")


def _sane_sizes(attrs: dict, url: str) -> dict[str, int]:
    """The config's dim sizes, each a non-negative integer within ``MAX_SIZES``: checked before
    anything is allocated from them (metadata claiming 10**12 questions is refused, not read)."""
    try:
        sizes = dict(attrs["config"]["sizes"])
    except (KeyError, TypeError, ValueError):
        raise SchemaError(f"{url} lacks config.sizes, or it is not a mapping of dim sizes") from None
    for dim, n in sizes.items():
        bound = MAX_SIZES.get(dim, MAX_SIZES[QUESTION])
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= bound:
            raise SchemaError(f"{url}: its metadata says {dim} = {n!r}, beyond any lake qsae writes (at most "
                              f"{bound:,}): refused before anything is read")
    return sizes
