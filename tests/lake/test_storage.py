"""Storage profiles and Secret-block credentials: settings from the environment, never the repo."""

from __future__ import annotations

import pytest

from flows.storage_blocks import resolve_secret_blocks
from qsae.lake.storage import load_profile


def test_profiles_read_the_environment(monkeypatch):
    root, opts = load_profile("local")
    assert root == "storage/lakes" and opts == {}
    monkeypatch.setenv("QSAE_S3_BUCKET", "my-bucket")
    monkeypatch.setenv("QSAE_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    root, opts = load_profile("s3")
    assert root == "s3://my-bucket/lakes"
    assert opts == {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}}
    monkeypatch.delenv("QSAE_S3_ENDPOINT")  # unset: dropped, so s3fs uses AWS's own endpoint
    assert "endpoint_url" not in load_profile("s3")[1]
    monkeypatch.delenv("QSAE_S3_BUCKET")
    with pytest.raises(ValueError, match="unset"):
        load_profile("s3")
    with pytest.raises(KeyError, match="no storage profile 'gcs'"):
        load_profile("gcs")


@pytest.mark.slow
def test_secret_blocks_are_resolved_at_run_time(prefect_server):
    from prefect.blocks.system import Secret

    Secret(value="AKIA-test").save("qsae-test-key", overwrite=True)
    Secret(value="s3cr3t").save("qsae-test-secret", overwrite=True)
    opts = {"key_block": "qsae-test-key", "secret_block": "qsae-test-secret", "endpoint_url": "http://x"}
    assert resolve_secret_blocks(opts) == {"key": "AKIA-test", "secret": "s3cr3t", "endpoint_url": "http://x"}
    assert resolve_secret_blocks({"endpoint_url": "http://x"}) == {"endpoint_url": "http://x"}
    assert resolve_secret_blocks(None) is None


def test_profiles_ship_with_the_package_and_a_project_file_overrides(tmp_path, monkeypatch):
    """Found inside the installed package (not only beside a source checkout), from any directory."""
    import fnmatch
    from pathlib import Path

    import tomllib

    import qsae
    from qsae.lake.storage import profiles_path

    monkeypatch.delenv("QSAE_PROFILES", raising=False)
    monkeypatch.chdir(tmp_path)
    shipped = profiles_path()
    assert shipped.is_relative_to(Path(qsae.__file__).parent) and load_profile("local")[0] == "storage/lakes"
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["qsae"]
    assert any(fnmatch.fnmatch(str(shipped.relative_to(Path(qsae.__file__).parent)), g) for g in globs)
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "profiles.yaml").write_text("local:\n  root: /data/lakes\n")
    assert load_profile("local") == ("/data/lakes", {})
    monkeypatch.setenv("QSAE_PROFILES", str(tmp_path / "none.yaml"))
    assert profiles_path() == tmp_path / "none.yaml"


def test_store_ref_is_one_handle_for_a_store(tmp_path, monkeypatch):
    """URL + options together: the zarr store, xarray's target, exists/delete, paths beside it."""
    import numpy as np

    from qsae.lake.storage import StoreRef
    from qsae.lake.store import QuestionLake, open_lake

    from ..helpers import random_shard, small_spec

    ref = StoreRef.of(str(tmp_path / "lake.zarr"))
    assert StoreRef.of(ref) is ref and str(ref) == ref.url and ref.options == {}
    assert not ref.exists()
    lake = QuestionLake.open_or_create(ref, small_spec(n_questions=8))
    lake.write_shard(0, random_shard(lake, 0))
    assert ref.exists() and lake.ref == ref
    np.testing.assert_array_equal(open_lake(ref).done.values, QuestionLake.open(ref.url).done_mask())
    roc = ref.figures / "rivalry/roc.png"  # a ref inside a ref: its options travel with it
    assert isinstance(roc, StoreRef) and roc.url == str(tmp_path / "lake.zarr.figures" / "rivalry" / "roc.png")
    ref.delete()
    assert not ref.exists() and not (tmp_path / "lake.zarr").exists()
    # Remote: the options travel with the URL; none given means the environment's.
    monkeypatch.setenv("QSAE_S3_ENDPOINT", "http://127.0.0.1:9")
    s3 = StoreRef.of("s3://bucket/lake.zarr")
    assert s3.options == {"endpoint_url": "http://127.0.0.1:9"} and s3.local_path is None
    assert (s3.figures / "x.png").url == "s3://bucket/lake.zarr.figures/x.png"
    given = StoreRef.of("s3://bucket/lake.zarr", {"key": "k"})
    assert (given.figures / "x.png").storage_options == {"key": "k"}  # not dropped on the way in (it was a str)
    assert given.options == {"key": "k"} and StoreRef.of(given, {"key": "k"}) is given
    with pytest.raises(ValueError, match="storage_options given twice"):
        StoreRef.of(given, {"key": "other"})
    mem = StoreRef.of("memory://qsae-ref-test/lake.zarr")
    QuestionLake.open_or_create(mem, small_spec(n_questions=8))
    assert mem.exists()
    mem.delete()
    assert not mem.exists()
