"""Lake stores: create, validate, open and write one Zarr v3 store per run.

Two kinds share this machinery (see ``qsae.lake.schema``): the question lake of a capture run
(unit: question) and the token lake of a collection run (unit: token). Writes go by shard:
a region of ``shard_size`` units across every layer, so independent workers touch disjoint
files, a retried task rewrites exactly its own region, and the ``done`` mask (written last)
says which units are complete. A region that does not align with the shard grid is refused:
two writers sharing a shard lose data silently.

This module is the store handle (``Lake``: open, create or resume, write regions durably,
mark done); what fixes a store's shape and identity is in ``qsae.lake.spec``, the schema check
on open in ``qsae.lake.validate``, the lineage keys in ``qsae.lake.lineage``.

Imports numpy/zarr/xarray only, so notebooks and dask workers can read without torch.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from qsae.errors import (
    ConcurrentCreationError,
    ConfigMismatchError,
    LakeDamagedError,
    QsaeError,
    RegionError,
    SchemaError,
    StoreUnreachableError,
)
from qsae.lake.creation import _busy_message, _creation_state, _reclaim_incomplete, creation_stale_seconds  # noqa: F401
from qsae.lake.durability import (  # noqa: F401 (BEFORE_DONE and write_timeout are part of this module's API)
    BEFORE_DONE,
    RegionHooks,
    _fsync,
    _fsync_pool,
    _run_concurrently,
    _store_error,
    write_timeout,
)
from qsae.lake.schema import (
    DATASET_ID,
    LAYER,
    QUESTION,
    QUESTION_SCHEMA,
    SCHEMA_VERSION,
    SCHEMAS,
    TOKEN_SCHEMA,
    LakeSchema,
    Variable,
    resolve_dtype,
)
from qsae.lake.spec import (  # noqa: F401 (the specs are part of this module's API)
    LakeLayout,
    LakeSpec,
    TokenLakeSpec,
    _jsonable,
    _Spec,
    fingerprint,
    identity_diff,
)
from qsae.lake.storage import StoreRef
from qsae.lake.validate import CREATING, validate_group
from qsae.version import __version__

log = logging.getLogger("qsae.lake")

def _consolidate_metadata(store) -> None:
    """zarr's consolidate_metadata without its warning that consolidation is not in the v3 spec
    (qsae relies on it knowingly); scoped, so no filter is installed for the user's session."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store)

OpenMode = Literal["resume", "overwrite", "create"]



# Attribute of lakes whose every chunk is stored (fill values included) with a crc32c checksum:
# there a missing object is damage. Older lakes skipped all-fill chunks.
STORES_EVERY_CHUNK = "stores_every_chunk"
# CREATING (qsae.lake.validate): the attribute present while a store is being created (identity written first).


def _layout_for(var: Variable, unit: str, sizes: Mapping[str, int], layout: LakeLayout):
    """(chunks, shards) for a variable: one layer per chunk, unit blocks, rest whole."""
    outer, inner = [], []
    for dim in var.dims:
        if dim == LAYER:
            outer.append(1)
            inner.append(1)
        elif dim == unit:
            outer.append(layout.shard)
            inner.append(layout.chunk)
        else:
            outer.append(max(sizes[dim], 1))
            inner.append(max(sizes[dim], 1))
    if var.sharded and layout.chunk != layout.shard:
        return tuple(inner), tuple(outer)
    return tuple(outer), None


class Lake:
    """A store of one schema kind, opened through zarr for reading or region writes.

    ``Lake.open`` accepts any kind; the subclasses accept only their own.
    """

    schema: LakeSchema | None = None

    def __init__(self, ref: str | StoreRef, group: zarr.Group, storage_options: dict | None = None):
        self.ref = StoreRef.of(ref, storage_options)
        self.url, self.storage_options = self.ref.url, self.ref.storage_options
        self.group = group
        self.attrs = dict(group.attrs)
        self.schema = SCHEMAS[self.attrs["kind"]]
        present = set(group.array_keys())
        self.variables = tuple(v for v in self.schema.variables_for(self.attrs.get("d_sae") is not None)
                               if not v.optional or v.name in present)  # older lakes lack optional ones
        # Array handles opened once: each group lookup costs a metadata read. Every chunk is
        # stored, fill values included (zarr's default skips all-fill chunks), so a missing
        # object in a done region is damage, never "all fill" (``qsae.lake.integrity``).
        # Per array, not through zarr's global config: Prefect runs tasks in threads, and a
        # process-wide setting entered and left by one thread would leave another's arrays without it.
        self.arrays: dict[str, zarr.Array] = {v.name: group[v.name].with_config({"write_empty_chunks": True})
                                              for v in self.variables}

    # ----------------------------------------------------------------- open/create
    @classmethod
    def open_or_create(cls, target: str | StoreRef, spec: _Spec, mode: OpenMode = "resume",
                       storage_options: dict | None = None):
        """Create the store for ``spec``, or reopen it to resume the same run.

        ``resume``: reopen an existing store only if its config equals ``spec`` (else
        ConfigMismatchError naming each difference). ``overwrite``: delete any existing
        store and start a new run. ``create``: refuse if a store exists.
        """
        ref = StoreRef.of(target, storage_options)
        url = ref.url
        exists = store_exists(ref)
        if exists and mode == "create":
            raise ConfigMismatchError(f"a store already exists at {url} (mode='create')")
        if exists and mode == "overwrite":
            ref.delete()
            exists = False
        if _creation_state(ref) is not None:  # an unfinished creation (or an empty claimed folder)
            _reclaim_incomplete(ref, spec)  # raises unless it was safe to remove
            exists = False
        if exists:
            lake = cls.open(ref, mode="r+")
            diff = identity_diff(lake.attrs["config"], spec.identity())
            if diff:
                lines = "\n".join(f"  {k}: store has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
                done = int(np.asarray(lake.arrays["done"][:]).sum()) if "done" in lake.arrays else 0
                total = int(lake.arrays["done"].shape[0]) if "done" in lake.arrays else 0
                loss = (f"mode='overwrite' would DELETE it, with its {done} done of {total} "
                        f"{'questions' if spec.schema.kind == 'questions' else 'tokens'}" if done else
                        "mode='overwrite' would delete it (nothing in it is done yet)")
                raise ConfigMismatchError(
                    f"the store at {url} was written with a different config:\n{lines}\n"
                    f"Use another --store; {loss} and start a new run there."
                )
            return lake
        try:
            return cls._create(ref, spec)
        except QsaeError:
            raise
        except Exception as exc:  # noqa: BLE001 - typed when it is the store's failure
            raise _store_error(exc, f"creating the store at {url}", "nothing was written to it yet; free space "
                               "and rerun (the capture re-creates it)") from None

    @classmethod
    def _create(cls, ref: StoreRef, spec: _Spec):
        """Create the store, its identity first: the root group is written with every attribute
        and a ``creating`` mark, then the arrays, then the mark is removed. A creation that dies
        leaves a store recognisably incomplete (``_reclaim_incomplete`` re-creates it); two at
        once never delete each other's (the loser gets ConcurrentCreationError)."""
        token = uuid.uuid4().hex
        path = ref.local_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()  # atomic: of two creators exactly one gets here
            except FileExistsError:
                if not path.is_dir() or (not (path / "zarr.json").exists() and any(
                        p.name != "zarr.json" and not (p / "zarr.json").exists() for p in path.iterdir())):
                    raise SchemaError(f"{ref.url} exists and is not a qsae lake (a file, or a folder holding other "
                                      "files): choose another --store") from None
                raise ConcurrentCreationError(_busy_message(ref)) from None
        identity = spec.identity()
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "kind": spec.schema.kind,
            **{k: _jsonable(v) for k, v in spec.lineage.items()},
            **_jsonable(spec.extra_attrs()),
            "resid_dtype": spec.resid_dtype,
            "qsae_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": identity,
            "config_fingerprint": fingerprint(identity),
            STORES_EVERY_CHUNK: True,
            CREATING: {"token": token, "started": time.time(), "pid": os.getpid()},
        }
        store = ref.zarr_store()
        try:
            group = zarr.open_group(store=store, mode="w-", zarr_format=3, attributes=attrs)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise ConcurrentCreationError(_busy_message(ref)) from None
        if path is None:  # object stores have no atomic create: the last writer of the mark wins
            time.sleep(0.2)
            mark = dict(zarr.open_group(store=ref.zarr_store(read_only=True), mode="r", zarr_format=3,
                                        use_consolidated=False).attrs).get(CREATING) or {}
            if mark.get("token") != token:
                raise ConcurrentCreationError(_busy_message(ref))
        sizes = spec.sizes()
        for name, values in spec.coords().items():
            arr = group.create_array(name, shape=values.shape, chunks=values.shape, dtype=values.dtype,
                                     dimension_names=[name], compressors=[Crc32cCodec()])
            arr[:] = values
        dataset_ids = getattr(spec, "dataset_ids", None)
        if dataset_ids is not None:
            var = DATASET_ID
            arr = group.create_array(var.name, shape=(len(dataset_ids),), chunks=(len(dataset_ids),), dtype="str",
                                     dimension_names=list(var.dims), attributes={"description": var.doc})
            arr[:] = np.asarray(dataset_ids, dtype=str)
        for var in spec.schema.variables_for(spec.has_sae):
            chunks, shards = _layout_for(var, spec.schema.unit, sizes, spec.layout)
            group.create_array(
                var.name,
                shape=tuple(sizes[d] for d in var.dims),
                chunks=chunks,
                shards=shards,
                dtype=resolve_dtype(var, spec.resid_dtype, spec.d_sae),
                fill_value=var.fill,
                dimension_names=list(var.dims),
                # crc32c on every chunk: a flipped bit or a truncated file fails to decode, loudly
                compressors=[ZstdCodec(level=3), Crc32cCodec()] if var.compress else [Crc32cCodec()],
                attributes={"description": var.doc},
                # Skip zarr's scan of every chunk for "all fill value": regions are whole shards.
                config={"write_empty_chunks": True},
            )
        del group.attrs[CREATING]  # the identity is complete: the store is now a lake
        _consolidate_metadata(store)
        return cls.open(ref, mode="r+")

    @classmethod
    def open(cls, target: str | StoreRef, mode: Literal["r", "r+"] = "r", storage_options: dict | None = None):
        """Open an existing store and validate it against its schema."""
        ref = StoreRef.of(target, storage_options)
        url = ref.url
        try:
            store = ref.zarr_store(read_only=(mode == "r"))
            group = zarr.open_group(store=store, mode=mode, zarr_format=3, use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            path = ref.local_path
            if path is not None and path.exists():  # reachable, just not a lake
                raise SchemaError(f"{url} exists but is not a qsae lake (no zarr group there): name a lake's "
                                  "folder, e.g. storage/lakes/demo.zarr") from None
            raise StoreUnreachableError(f"no lake at {url}: {exc}") from exc
        except Exception as exc:  # transport errors come from many libraries (botocore, aiohttp, ...)
            raise StoreUnreachableError(f"cannot open the store at {url}: {type(exc).__name__}: {exc}") from exc
        validate_group(group, url, expect=cls.schema)
        return cls(ref, group)

    # --------------------------------------------------------------------- layout
    @property
    def layout(self) -> LakeLayout:
        cfg = self.attrs["config"]
        return LakeLayout(cfg["shard_size"], cfg["chunk_size"])

    @property
    def n_units(self) -> int:
        return int(self.arrays["done"].shape[0])

    @property
    def n_shards(self) -> int:
        return -(-self.n_units // self.layout.shard)

    def shard_region(self, shard: int) -> slice:
        """The unit slice of shard number ``shard``."""
        if not 0 <= shard < self.n_shards:
            raise RegionError(f"shard {shard} out of range: the store has {self.n_shards} shards")
        q = self.layout.shard
        return slice(shard * q, min((shard + 1) * q, self.n_units))

    def check_aligned(self, region: slice) -> None:
        """Refuse a region that does not start and end on the shard grid."""
        q, n, unit = self.layout.shard, self.n_units, self.schema.unit
        start, stop = region.start, region.stop
        if start is None or stop is None or not (0 <= start < stop <= n):
            raise RegionError(f"region {region} is empty or outside 0..{n}")
        if start % q or (stop % q and stop != n):
            raise RegionError(
                f"region {start}:{stop} does not align with the shard grid of {q} {unit}s "
                f"(store has {n} {unit}s): a write sharing a shard with another writer would lose data"
            )

    # ---------------------------------------------------------------------- state
    def done_mask(self) -> np.ndarray:
        return np.asarray(self.arrays["done"][:], dtype=bool)

    def pending_shards(self) -> list[int]:
        """Shards with at least one unit not done (these are (re)written whole)."""
        done = self.done_mask()
        return [s for s in range(self.n_shards) if not done[self.shard_region(s)].all()]

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.group[LAYER][:]]

    # ---------------------------------------------------------------------- write
    def expected_shape(self, var: Variable, n_region: int) -> tuple[int, ...]:
        shape = list(self.arrays[var.name].shape)
        shape[var.dims.index(self.schema.unit)] = n_region
        return tuple(shape)

    def write_region(self, region: slice, data: Mapping[str, np.ndarray], durable: bool = True) -> None:
        """Write every variable of a shard-aligned region, then mark it done.

        ``data`` must hold each variable except ``done``, shaped like the region. If the
        region was done before (a forced rewrite), it is marked not done first, so a crash
        in between never leaves stale data marked done.
        """
        self.check_aligned(region)
        n = region.stop - region.start
        wanted = {v.name: v for v in self.variables if v.name != "done"}
        missing = sorted(set(wanted) - set(data))
        unknown = sorted(set(data) - set(wanted))
        if missing or unknown:
            raise SchemaError(f"write_region: missing variables {missing}, unknown variables {unknown}")
        for name, var in wanted.items():
            shape = self.expected_shape(var, n)
            if tuple(np.shape(data[name])) != shape:
                raise SchemaError(
                    f"write_region: {name} has shape {tuple(np.shape(data[name]))}, expected {shape} {var.dims}"
                )
        done = self.arrays["done"].async_array
        what = f"{self.url} region {region.start}:{region.stop}"
        if np.asarray(self.arrays["done"][region]).any():
            _run_concurrently([done.setitem(region, False)], what)
        writes = []
        for name, var in wanted.items():
            index = tuple(region if d == self.schema.unit else slice(None) for d in var.dims)
            writes.append(self.arrays[name].async_array.setitem(index, np.asarray(data[name])))
        _run_concurrently(writes, what)
        if durable:
            self._sync_region(region, wanted.values())
        BEFORE_DONE(self.url, region)
        _run_concurrently([done.setitem(region, True)], what)
        if durable:
            self._sync_region(region, [v for v in self.variables if v.name == "done"])

    def write_shard(self, shard: int, data: Mapping[str, np.ndarray], durable: bool = True) -> None:
        """Write one whole shard (see ``write_region``)."""
        self.write_region(self.shard_region(shard), data, durable=durable)

    def _sync_region(self, region: slice, variables) -> None:
        """fsync the shard files of a region on local disk (remote stores are durable on PUT)."""
        root = self.ref.local_path
        if root is None:
            return
        shard_idx = region.start // self.layout.shard
        paths = []
        for var in variables:
            arr = self.arrays[var.name]
            ranges = []
            for dim in var.dims:
                if dim == LAYER:
                    ranges.append(range(arr.shape[0]))
                elif dim == self.schema.unit:
                    ranges.append([shard_idx])
                else:
                    ranges.append([0])
            for coords in np.ndindex(*[len(r) for r in ranges]):
                key = arr.metadata.encode_chunk_key(tuple(r[i] for r, i in zip(ranges, coords)))
                paths.append(root / var.name / key)
        list(_fsync_pool().map(_fsync, paths))

    def update_attrs(self, **attrs: Any) -> None:
        """Add run statistics or links to the attributes (never identity keys)."""
        clash = set(attrs) & {"config", "config_fingerprint", "schema_version", "kind"}
        if clash:
            raise ValueError(f"refusing to change identity attributes {sorted(clash)}")
        self.group.attrs.update({k: _jsonable(v) for k, v in attrs.items()})
        self.attrs = dict(self.group.attrs)
        consolidate(self.ref)

    def to_xarray(self, **kwargs: Any) -> xr.Dataset:
        return open_lake(self.ref, **kwargs)


class QuestionLake(Lake):
    """The question lake of a capture run (see ``shared/DESIGN.md``)."""

    schema = QUESTION_SCHEMA

    @property
    def n_questions(self) -> int:
        return self.n_units

    def question_ids(self) -> np.ndarray:
        return np.asarray(self.group[QUESTION][:])


class TokenLake(Lake):
    """The token lake of a collection run: activations of every token of a corpus."""

    schema = TOKEN_SCHEMA


# ----------------------------------------------------------------- module helpers
def store_exists(target: str | StoreRef, storage_options: dict | None = None) -> bool:
    """True if a zarr group exists at the URL; StoreUnreachableError if it cannot be asked."""
    ref = StoreRef.of(target, storage_options)
    url = ref.url
    try:
        store = ref.zarr_store(read_only=True)
        zarr.open_group(store=store, mode="r", zarr_format=3, use_consolidated=False)
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    except Exception as exc:  # transport errors come from many libraries (botocore, aiohttp, ...)
        raise StoreUnreachableError(f"cannot reach the store at {url}: {type(exc).__name__}: {exc}") from exc


def consolidate(target: str | StoreRef, storage_options: dict | None = None) -> None:
    """Rewrite the consolidated metadata so xarray opens the store in one read.

    Remote filesystems (s3fs) cache directory listings per instance: a stale listing would
    leave groups written since out of the consolidated metadata, so the cache is dropped.
    """
    store = StoreRef.of(target, storage_options).zarr_store()
    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    _consolidate_metadata(store)


def require_intact(lake: Lake, shown: int = 5) -> None:
    """LakeDamagedError naming the objects done questions need that are missing or empty (one
    listing of the store: cheap enough for every analysis that opens a lake)."""
    from qsae.lake.integrity import find_damage, list_objects, undone_with_data

    objects, done = list_objects(lake), lake.done_mask()  # one listing, one read of `done`
    damage = find_damage(lake, limit=shown + 1, objects=objects, done=done)
    if damage:
        more = " (and more)" if len(damage) > shown else ""
        lines = "\n".join(f"  {d}" for d in damage[:shown])
        raise LakeDamagedError(
            f"{lake.url} is damaged: objects that done questions need are missing or empty{more}:\n{lines}\n"
            f"zarr would read fill values there. Run `qsae verify {lake.url}` for the full list; "
            "recapture those questions (or restore the files) before analysing.")
    pending = undone_with_data(lake, objects, done)
    if pending:
        n = sum(lake.shard_region(k).stop - lake.shard_region(k).start for k in pending)
        log.warning("%s: shards %s hold all their data but are not marked done (an interrupted capture, or a lost "
                    "`done` object): their %d questions are left out of this analysis; rerun the capture to finish "
                    "them, `qsae verify` to check", lake.url, pending, n)


def open_lake(target: str | StoreRef, storage_options: dict | None = None, group: str | None = None,
              check: bool = True, **kwargs: Any) -> xr.Dataset:
    """Open a lake (or one of its result groups) lazily with xarray, after schema checks and,
    with ``check``, a check that every object its done questions need is there.

    Equivalent to ``xarray.open_zarr(url)`` on a valid lake; dask-backed, one dask chunk
    per inner zarr chunk unless ``chunks=`` says otherwise.
    """
    ref = StoreRef.of(target, storage_options)
    if group is None:
        lake = Lake.open(ref)  # reachable, and valid for its kind
        if check:
            require_intact(lake)
    path, opts = ref.xarray_target()
    kwargs.setdefault("consolidated", None)
    ds = xr.open_zarr(path, storage_options=opts or None, group=group, **kwargs)
    # where it came from, for the accessor (``ds.qsae.select(group=...)`` reads the rivalry groups beside it)
    ds.encoding["qsae_store"] = ref.absolute
    ds.encoding["qsae_storage_options"] = ref.storage_options
    return ds
