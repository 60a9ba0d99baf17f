"""The lake contract: schema, layout, region writes, done mask, config identity, URLs."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from qsae.errors import ConfigMismatchError, NewerSchemaError, RegionError, SchemaError, StoreUnreachableError
from qsae.lake.schema import SCHEMA_VERSION, VARIABLES, index_dtype
from qsae.lake.store import LakeLayout, QuestionLake, open_lake

from ..helpers import random_shard, small_spec


def test_index_dtype_is_smallest_that_holds_d_sae():
    assert index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16
    assert index_dtype(32768) == np.uint16  # Qwen-Scope W32K
    assert index_dtype(65536) == np.uint16
    assert index_dtype(65537) == np.uint32


def test_created_lake_follows_the_design_contract(tmp_path):
    url = str(tmp_path / "lake.zarr")
    lake = QuestionLake.open_or_create(url, small_spec())
    ds = xr.open_zarr(url)  # what users type
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    for key in ("model", "model_revision", "sae_source", "sae_sha256", "d_sae", "k", "hook", "dataset",
                "dataset_revision", "sampling", "seed", "qsae_version", "created"):
        assert key in ds.attrs, key
    assert list(ds.layer.values) == [3, 5]
    assert ds.question.dtype == np.int64 and ds.question.values[1] == 103
    assert list(ds.sample.values) == [0, 1, 2, 3]
    for var in VARIABLES:
        assert ds[var.name].dims == var.dims, var.name
    assert ds.resid.dtype == np.float16
    assert ds.codes_idx.dtype == np.uint16
    assert isinstance(ds.resid.data, da.Array)
    assert ds.resid.encoding["shards"] == (1, 16, 4, 8)
    assert ds.resid.encoding["chunks"] == (1, 4, 4, 8)
    assert not ds.done.values.any()
    assert lake.pending_shards() == [0, 1, 2, 3, 4]


def test_shard_write_round_trips_and_marks_done(tmp_path):
    url = str(tmp_path / "lake.zarr")
    lake = QuestionLake.open_or_create(url, small_spec())
    data = random_shard(lake, 1)
    lake.write_shard(1, data)
    last = random_shard(lake, 4)  # the partial last shard: questions 64..69
    lake.write_shard(4, last)
    ds = open_lake(url)
    np.testing.assert_array_equal(ds.done.values, np.r_[np.zeros(16), np.ones(16), np.zeros(32), np.ones(6)].astype(bool))
    np.testing.assert_array_equal(ds.resid.isel(question=slice(16, 32)).values, data["resid"])
    np.testing.assert_array_equal(ds.codes_idx.isel(question=slice(64, 70)).values, last["codes_idx"])
    np.testing.assert_array_equal(ds.completion.isel(question=slice(16, 32)).values, data["completion"])
    assert lake.pending_shards() == [0, 2, 3]


def test_misaligned_regions_are_refused(tmp_path):
    lake = QuestionLake.open_or_create(str(tmp_path / "lake.zarr"), small_spec())
    data = random_shard(lake, 1)
    for bad in (slice(8, 24), slice(16, 24), slice(60, 70), slice(0, 0), slice(64, 80)):
        with pytest.raises(RegionError):
            lake.write_region(bad, data)
    assert not lake.done_mask().any()


def test_wrong_shapes_and_missing_variables_are_refused_before_writing(tmp_path):
    lake = QuestionLake.open_or_create(str(tmp_path / "lake.zarr"), small_spec())
    data = random_shard(lake, 0)
    bad = dict(data, resid=data["resid"][:, :, :3])
    with pytest.raises(SchemaError, match=r"resid has shape \(2, 16, 3, 8\), expected \(2, 16, 4, 8\)"):
        lake.write_shard(0, bad)
    missing = {k: v for k, v in data.items() if k != "entropy"}
    with pytest.raises(SchemaError, match=r"missing variables \['entropy'\]"):
        lake.write_shard(0, missing)
    assert np.isnan(lake.group["resid"][0, 0, 0, 0])  # nothing was written


def test_rewriting_a_done_shard_clears_done_first(tmp_path, monkeypatch):
    lake = QuestionLake.open_or_create(str(tmp_path / "lake.zarr"), small_spec())
    lake.write_shard(0, random_shard(lake, 0))
    assert lake.done_mask()[:16].all()
    # A crash after the first variable of a rewrite must not leave the shard marked done.
    from zarr.core.array import AsyncArray

    real = AsyncArray.setitem
    calls = []

    async def crash_on_second_data_write(self, selection, value, prototype=None):
        if self.path != "done":
            calls.append(self.path)
            if len(calls) == 2:
                raise OSError("disk gone")
        return await real(self, selection, value, prototype)

    monkeypatch.setattr(AsyncArray, "setitem", crash_on_second_data_write)
    with pytest.raises(OSError):
        lake.write_shard(0, random_shard(lake, 0, seed=9))
    monkeypatch.undo()
    assert not lake.done_mask()[:16].any()


def test_other_config_is_refused_unless_a_new_run_is_asked(tmp_path):
    url = str(tmp_path / "lake.zarr")
    lake = QuestionLake.open_or_create(url, small_spec())
    lake.write_shard(0, random_shard(lake, 0))
    same = QuestionLake.open_or_create(url, small_spec())  # resume: same config is fine
    assert same.done_mask()[:16].all()
    changes = {
        "layers": dict(layers=(3, 6)),
        r"sizes\.sample": dict(n_samples=5),
        "resid_dtype": dict(resid_dtype="float32"),
        r"sae_sha256\.3": dict(lineage={"sae_sha256": {"3": "cc", "5": "bb"}}),
        "model": dict(lineage={"model": "other-model"}),
    }
    for key, change in changes.items():
        with pytest.raises(ConfigMismatchError, match=rf"{key}: store has"):
            QuestionLake.open_or_create(url, small_spec(**change))
    with pytest.raises(ConfigMismatchError, match=r"sae_sha256\.3: store has 'aa', asked for 'cc'"):
        QuestionLake.open_or_create(url, small_spec(lineage={"sae_sha256": {"3": "cc", "5": "bb"}}))
    fresh = QuestionLake.open_or_create(url, small_spec(n_samples=5), mode="overwrite")
    assert not fresh.done_mask().any() and fresh.group["resid"].shape[2] == 5
    with pytest.raises(ConfigMismatchError, match="already exists"):
        QuestionLake.open_or_create(url, small_spec(), mode="create")


def test_newer_schema_and_broken_stores_are_refused(tmp_path):
    url = str(tmp_path / "lake.zarr")
    QuestionLake.open_or_create(url, small_spec())
    g = zarr.open_group(url, mode="r+")
    g.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(NewerSchemaError, match=f"schema version {SCHEMA_VERSION + 1}"):
        open_lake(url)
    g.attrs["schema_version"] = SCHEMA_VERSION
    del g["entropy"]
    with pytest.raises(SchemaError, match="lacks the variable 'entropy'"):
        QuestionLake.open(url)
    with pytest.raises(StoreUnreachableError):
        QuestionLake.open(str(tmp_path / "nothing.zarr"))
    not_a_lake = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    not_a_lake.attrs["x"] = 1
    with pytest.raises(SchemaError, match="not a qsae lake"):
        QuestionLake.open(str(tmp_path / "plain.zarr"))


def test_lake_without_sae_has_no_code_variables(tmp_path):
    lake = QuestionLake.open_or_create(str(tmp_path / "l.zarr"), small_spec(d_sae=None, k=None))
    names = {v.name for v in lake.variables}
    assert "resid" in names and "codes_idx" not in names
    lake.write_shard(0, random_shard(lake, 0))
    assert "codes_idx" not in open_lake(lake.url)


def test_layout_must_nest():
    with pytest.raises(ValueError, match="multiple"):
        LakeLayout(questions_per_shard=10, questions_per_chunk=4)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["memory", "s3"])
def test_same_code_works_on_remote_urls(scheme, request):
    if scheme == "s3":
        _, opts = request.getfixturevalue("s3_server")
        url = "s3://lake/test-remote.zarr"
    else:
        opts, url = None, "memory://qsae-test/remote.zarr"
    lake = QuestionLake.open_or_create(url, small_spec(), storage_options=opts)
    data = random_shard(lake, 2)
    lake.write_shard(2, data)
    ds = open_lake(url, storage_options=opts)
    np.testing.assert_array_equal(ds.codes_val.isel(question=slice(32, 48)).values, data["codes_val"])
    assert int(ds.done.sum()) == 16
    with pytest.raises(ConfigMismatchError):
        QuestionLake.open_or_create(url, small_spec(n_samples=2), storage_options=opts)


# ------------------------------------------ creation that survives a crash and a race (issue 28)
def test_an_interrupted_creation_is_recreated_by_the_next_capture(tmp_path, monkeypatch):
    import errno

    from qsae.errors import ConcurrentCreationError, IncompleteStoreError

    url = str(tmp_path / "lake.zarr")
    real = zarr.Group.create_array
    calls = {"n": 0}

    def dies_after_five(self, *a, **kw):  # a full disk, or a kill, half-way through creation
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    from qsae.errors import StoreFullError

    monkeypatch.setattr(zarr.Group, "create_array", dies_after_five)
    with pytest.raises(StoreFullError, match="out of disk space creating the store"):
        QuestionLake.open_or_create(url, small_spec())
    monkeypatch.setattr(zarr.Group, "create_array", real)
    with pytest.raises(IncompleteStoreError, match="being created, or its creation was interrupted"):
        open_lake(url)  # readers are told what it is
    with pytest.raises(ConcurrentCreationError, match="another capture is creating"):
        QuestionLake.open_or_create(url, small_spec())  # seconds later it may still be another writer's
    monkeypatch.setenv("QSAE_CREATE_STALE_S", "0")
    with pytest.raises(ConfigMismatchError, match="seed"):  # another config: the real reason, store untouched
        QuestionLake.open_or_create(url, small_spec(lineage={"seed": 1}))
    lake = QuestionLake.open_or_create(url, small_spec())  # the same config: re-created, no --mode overwrite
    assert lake.pending_shards() == list(range(lake.n_shards)) and "creating" not in lake.attrs
    lake.write_shard(0, random_shard(lake, 0))
    # a store from before the creating mark: a group without schema_version is re-created too
    legacy = str(tmp_path / "legacy.zarr")
    zarr.open_group(legacy, mode="w").create_array("question", shape=(3,), dtype="int64")
    monkeypatch.setenv("QSAE_CREATE_STALE_S", "30")
    with pytest.raises(ConcurrentCreationError):  # just written: it may be another writer's group in progress
        QuestionLake.open_or_create(legacy, small_spec())
    monkeypatch.setenv("QSAE_CREATE_STALE_S", "0")
    assert QuestionLake.open_or_create(legacy, small_spec()).attrs["schema_version"] == SCHEMA_VERSION
    # but never one that holds done data
    g = zarr.open_group(url, mode="r+")
    g.attrs["creating"] = {"token": "x", "started": 0}
    with pytest.raises(IncompleteStoreError, match="has done questions"):
        QuestionLake.open_or_create(url, small_spec())


def _create_at(url, t0, seed, q):
    import time as _time

    from qsae.errors import QsaeError

    while _time.time() < t0:
        pass
    try:
        QuestionLake.open_or_create(url, small_spec(lineage={"seed": seed}))
        q.put(("ok", seed))
    except QsaeError as exc:
        q.put((type(exc).__name__, str(exc).splitlines()[0]))
    except Exception as exc:  # noqa: BLE001 - a raw error is what the test must not see
        q.put(("RAW " + type(exc).__name__, str(exc)))


@pytest.mark.slow
def test_two_captures_creating_one_store_end_with_one_store(tmp_path):
    import multiprocessing as mp
    import time as _time

    ctx = mp.get_context("spawn")
    for i, seeds in enumerate([(0, 0), (0, 1), (0, 0), (0, 1)]):
        url = str(tmp_path / f"race{i}.zarr")
        q = ctx.Queue()
        t0 = _time.time() + 4.0  # both processes imported and spinning by then
        procs = [ctx.Process(target=_create_at, args=(url, t0, s, q)) for s in seeds]
        for p in procs:
            p.start()
        out = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        kinds = sorted(k for k, _ in out)
        assert not any(k.startswith("RAW") for k in kinds), out
        winners = [v for k, v in out if k == "ok"]
        if seeds[0] == seeds[1]:
            # the loser stops (another capture is creating it) or, if the winner finished, resumes it
            assert len(winners) >= 1 and set(kinds) <= {"ok", "ConcurrentCreationError"}, out
        else:
            assert len(winners) == 1 and set(kinds) - {"ok"} <= {"ConcurrentCreationError", "ConfigMismatchError"}, out
        lake = QuestionLake.open(url)  # one complete store, the winner's
        assert "creating" not in lake.attrs and lake.attrs["seed"] in winners


def test_an_empty_claimed_folder_and_a_foreign_folder(tmp_path, monkeypatch):
    """A creation killed right after claiming its folder leaves it empty: re-created once stale;
    a folder holding other files is never taken for a lake."""
    import os

    from qsae.errors import ConcurrentCreationError

    url = tmp_path / "claimed.zarr"
    url.mkdir()
    with pytest.raises(ConcurrentCreationError):
        QuestionLake.open_or_create(str(url), small_spec())
    os.utime(url, (0, 0))  # long ago
    assert QuestionLake.open_or_create(str(url), small_spec()).attrs["schema_version"] == SCHEMA_VERSION
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("x")
    with pytest.raises(SchemaError, match="exists and is not a qsae lake"):
        QuestionLake.open_or_create(str(foreign), small_spec())
    assert (foreign / "todo.txt").exists()
