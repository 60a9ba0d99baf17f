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


def test_secret_blocks_are_resolved_at_run_time(prefect_server):
    from prefect.blocks.system import Secret

    Secret(value="AKIA-test").save("qsae-test-key", overwrite=True)
    Secret(value="s3cr3t").save("qsae-test-secret", overwrite=True)
    opts = {"key_block": "qsae-test-key", "secret_block": "qsae-test-secret", "endpoint_url": "http://x"}
    assert resolve_secret_blocks(opts) == {"key": "AKIA-test", "secret": "s3cr3t", "endpoint_url": "http://x"}
    assert resolve_secret_blocks({"endpoint_url": "http://x"}) == {"endpoint_url": "http://x"}
    assert resolve_secret_blocks(None) is None
