"""A lake written by qsae 0.1.0 before the layout change (tests/data/legacy-0.1.0.zarr: two of
its three shards done, as after a crash) opens, verifies and resumes with today's code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from qsae.lake.store import QuestionLake, open_lake

from ..helpers import random_shard, small_spec

LEGACY = Path(__file__).parents[1] / "data" / "legacy-0.1.0.zarr"


def test_a_lake_from_before_the_layout_change_opens_and_resumes(tmp_path):
    url = str(tmp_path / "legacy.zarr")
    shutil.copytree(LEGACY, url)
    spec = small_spec(n_questions=48, layers=(3, 5))  # the spec the old code wrote it with
    lake = QuestionLake.open_or_create(url, spec, mode="resume")  # same identity: no ConfigMismatchError
    assert lake.attrs["qsae_version"] == "0.1.0"
    assert lake.pending_shards() == [2] and int(lake.done_mask().sum()) == 32
    lake.write_shard(2, random_shard(lake, 2))
    assert QuestionLake.open(url).pending_shards() == []  # reopened and schema-validated, now complete

    fresh_url = str(tmp_path / "fresh.zarr")
    fresh = QuestionLake.open_or_create(fresh_url, spec, mode="create")
    for shard in range(fresh.n_shards):
        fresh.write_shard(shard, random_shard(fresh, shard))
    old, new = open_lake(url).load(), open_lake(fresh_url).load()
    assert set(new.data_vars) - set(old.data_vars) == {"nucleus_entropy", "relation", "subject", "s_pop", "o_pop"}
    for name in old.data_vars:
        np.testing.assert_array_equal(old[name].values, new[name].values, err_msg=name)
