"""Bad inputs get a clear, specific error (or are flagged in the store), and the verifier
catches a lake that breaks its invariants. SAE-file, dataset and schema-version cases live
beside their modules (test_sae_formats, test_datasets, test_lake); this file has the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from qsae.errors import LayerError, StoreUnreachableError
from qsae.jobs.capture import CaptureConfig, _layer_arrays, plan_capture, run_capture
from qsae.jobs.verify import verify
from qsae.lake.schema import FP16_MAX
from qsae.lake.store import open_lake
from qsae.lm.convert import to_lake_dtype
from qsae.sae.formats import load_sae

from ..helpers import tiny_capture, write_sae_folder


def test_unknown_layer_is_refused_before_anything_is_written(tiny_qwen_dir, tmp_path):
    cfg = CaptureConfig(model=str(tiny_qwen_dir), layers=[1, 7], limit=2, n_samples=2, device="cpu",
                        store=str(tmp_path / "x.zarr"))
    with pytest.raises(LayerError, match=r"layers \[7\] out of range.*4 layers \(0\.\.3\)"):
        plan_capture(cfg)
    assert not (tmp_path / "x.zarr").exists()


def test_unreachable_stores_give_a_clear_error(tmp_path):
    from qsae.errors import SchemaError

    with pytest.raises(StoreUnreachableError, match="no lake at"):
        open_lake(str(tmp_path / "missing.zarr"))
    (tmp_path / "lakes").mkdir()  # a folder of lakes, not a lake: reachable, so not "unreachable"
    with pytest.raises(SchemaError, match="exists but is not a qsae lake"):
        open_lake(str(tmp_path / "lakes"))
    opts = {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(StoreUnreachableError, match=r"s3://nowhere/lake.zarr"):
        open_lake("s3://nowhere/lake.zarr", storage_options=opts)


def test_nonfinite_and_overflowing_activations_are_flagged_not_hidden(tmp_path):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [float("inf"), 1.0, 2.0, 3.0], [float("nan"), 0, 0, 0],
                      [7.0e4, -1.0e5, 1.0, 2.0]])
    stored, norm, over, nonfinite = to_lake_dtype(x, "float16")
    assert nonfinite.tolist() == [0, 1, 1, 0] and over.tolist() == [0, 0, 0, 2]
    assert stored[3].tolist()[:2] == [FP16_MAX, -FP16_MAX]  # clipped, never inf
    assert torch.isinf(stored[1, 0]) and torch.isnan(stored[2, 0])  # the model's own inf/NaN are kept
    assert norm[0] == pytest.approx(30**0.5) and torch.isnan(norm[1]) and norm[3] == pytest.approx(float(x[3].norm()))
    # Through the capture's per-layer conversion with an SAE: flagged rows get the explicit
    # "no code" row (indices 0..k-1, values 0), every other row its TopK code.
    sae_dir = write_sae_folder(tmp_path / "sae", 4, 16, [0])
    sae = load_sae(sae_dir, layer=0, k=3)
    cfg = CaptureConfig(layers=[0], n_samples=2, sae_k=3)
    # completion ends (R=4 rows, d=4) and prompt ends (B=2 questions); S=2
    arrays = _layer_arrays({0: x[::2]}, {0: x}, {0: sae}, cfg, B=2, S=2)
    assert arrays["resid_nonfinite"].reshape(-1).tolist() == [0, 1, 1, 0]
    assert arrays["resid_overflow"].reshape(-1).tolist() == [0, 0, 0, 2]
    flagged = arrays["resid_nonfinite"].reshape(-1) > 0
    assert (arrays["codes_idx"].reshape(4, 3)[flagged] == [0, 1, 2]).all()
    assert (arrays["codes_val"].reshape(4, 3)[flagged] == 0).all()
    ok_idx, _ = sae.encode_topk(torch.from_numpy(arrays["resid"].reshape(4, 4)[0:1].astype(np.float32)))
    assert (arrays["codes_idx"].reshape(4, 3)[0] == ok_idx[0].numpy()).all()


@pytest.fixture(scope="module")
def good_lake(tmp_path_factory, captured):
    return tmp_path_factory.mktemp("verify"), captured(layers=(1,), sae_k=5, limit=4, resid_dtype="float32")


def _corrupt_copy(tmp, cfg, name, edit):
    import shutil

    dst = tmp / f"{name}.zarr"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cfg.store, dst)
    g = zarr.open_group(str(dst), mode="r+")
    edit(g)
    return str(dst)


def test_qwen_scope_codes_keep_negative_values_and_verify_counts_them(tmp_path, tiny_qwen_dir):
    """A Qwen-Scope SAE whose top-k pre-activations are all negative: the lake stores exactly
    k non-zero (negative) values per row as the official code does, records that in its
    lineage, and the verifier accepts and counts them (it refuses negatives in ReLU'd codes)."""
    sae = write_sae_folder(tmp_path / "sae", 64, 128, [1])
    d = torch.load(sae / "layer1.sae.pt", weights_only=True)
    d["b_enc"] = torch.full((128,), -100.0)
    torch.save(d, sae / "layer1.sae.pt")
    cfg = tiny_capture(tiny_qwen_dir, sae, tmp_path / "neg.zarr", layers=[1], sae_k=5, limit=2, resid_dtype="float32")
    run_capture(cfg)
    ds = open_lake(cfg.store).load()
    assert ds.attrs["sae_topk_relu"] == {"1": False}
    assert (ds.codes_val.values < 0).all() and (ds.prompt_codes_val.values < 0).all()
    report = verify(cfg.store, reencode=4)
    assert report.ok, report.text()
    assert report.checks["codes_val_rows_with_negative_values"] == 2 * 3
    assert report.checks["prompt_codes_val_rows_with_negative_values"] == 2
    g = zarr.open_group(cfg.store, mode="r+")
    g.attrs["sae_topk_relu"] = {"1": True}  # claim ReLU'd codes: the negatives are now errors
    assert any("negative or non-finite" in p for p in verify(cfg.store).problems)


def test_a_layer_the_lake_lacks_is_a_layer_error(good_lake):
    _, cfg = good_lake
    ds = open_lake(cfg.store)
    with pytest.raises(LayerError, match=r"layer 12 is not in this lake \(layers \[1\]\)"):
        ds.qsae.feature_activation([3], layer=12)


def test_verifier_passes_a_good_lake_and_reencodes_it(good_lake):
    _, cfg = good_lake
    report = verify(cfg.store, reencode=12)
    assert report.ok, report.text()
    assert report.checks["done"] == 4 and report.checks["sae_hashes_verified_layers"] == [1]
    assert json.loads(report.to_json())["ok"] is True


def _break_padding(g):
    """Write a token id after the completion's end (or an impossible length if it is full)."""
    n = int(g["completion_len"][3, 0])
    if n < g["completion_ids"].shape[-1]:
        g["completion_ids"][3, 0, n] = 5
    else:
        g["completion_len"][3, 0] = 0


@pytest.mark.parametrize("name, edit, message", [
    ("dupidx", lambda g: g["codes_idx"].__setitem__((0, 0, 0, slice(0, 2)), [7, 7]), "not strictly ascending"),
    ("bigidx", lambda g: g["codes_idx"].__setitem__((0, 1, 1, 4), 200), "indices outside 0..127"),
    ("nan", lambda g: g["resid"].__setitem__((0, 2, 0, 5), np.nan), "non-finite values not matching"),
    ("norm", lambda g: g["resid_norm"].__setitem__((0, 0, 0), 1e6), "does not match the stored resid"),
    ("pad", _break_padding, "completion"),
    ("codes", lambda g: g["codes_val"].__setitem__((0, 0, 0, 0), 123.0), "differ from re-encoding"),
    ("entropy", lambda g: g["sample_entropy"].__setitem__(1, 5.0), "sample_entropy outside"),
    ("text", lambda g: g["completion"].__setitem__((2, 1), "not what was sampled"),
     "completion differs from its decoded completion_ids"),
    ("prompt", lambda g: g["prompt_codes_val"].__setitem__((0, 1, 0), 99.0), "prompt end: stored codes differ"),
])
def test_verifier_finds_each_corruption(good_lake, name, edit, message):
    tmp, cfg = good_lake
    url = _corrupt_copy(tmp, cfg, name, edit)
    report = verify(url, reencode=12)
    assert not report.ok and any(message in p for p in report.problems), report.text()


def test_verifier_reports_a_wrong_sae_file_and_a_broken_schema(good_lake):
    tmp, cfg = good_lake
    other = write_sae_folder(tmp / "other-sae", 64, 128, [1], scale=2.0)
    url = _corrupt_copy(tmp, cfg, "othersae", lambda g: g.attrs.update(sae_source=str(other)))
    report = verify(url)
    assert any("not the same file" in p for p in report.problems), report.text()
    url = _corrupt_copy(tmp, cfg, "noschema", lambda g: g.attrs.__delitem__("schema_version"))
    assert any("not a qsae lake" in p for p in verify(url).problems)


@pytest.mark.slow
def test_verify_cli_exit_status(good_lake, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, cfg = good_lake
    qsae = str(Path(sys.executable).parent / "qsae")
    ok = subprocess.run([qsae, "verify", cfg.store, "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    bad = subprocess.run([qsae, "verify", str(tmp_path / "nothing.zarr")], capture_output=True, text=True)
    assert bad.returncode == 1 and "StoreUnreachableError" in bad.stdout


# ------------------------------------------------ lost and damaged objects (issue 28)
def _objects(url, name):
    from pathlib import Path

    return sorted(p for p in (Path(url) / name).rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("name", ["prompt_codes_val", "completion", "codes_val"])
def test_a_lost_object_is_found_by_verify_and_refused_by_the_analyses(good_lake, name):
    from qsae.errors import LakeDamagedError
    from qsae.jobs.reconstruction import ReconstructionConfig, run_reconstruction
    from qsae.jobs.rivalry import RivalryConfig, run_rivalry

    tmp, cfg = good_lake
    url = _corrupt_copy(tmp, cfg, f"lost-{name}", lambda g: None)
    lost = _objects(url, name)[-1]  # the last shard: questions 2..3
    lost.unlink()
    report = verify(url)
    key = lost.relative_to(url).as_posix()
    assert not report.ok and any(p.startswith(key) and "missing" in p and "questions 2..3" in p
                                 for p in report.problems), report.text()
    for run in (lambda: open_lake(url), lambda: run_rivalry(RivalryConfig(store=url, n_perm=9, correctness=False)),
                lambda: run_reconstruction(ReconstructionConfig(store=url))):
        with pytest.raises(LakeDamagedError, match=f"{key}.*missing"):
            run()


def test_a_lost_done_object_is_reported(good_lake):
    tmp, cfg = good_lake
    url = _corrupt_copy(tmp, cfg, "lost-done", lambda g: None)
    _objects(url, "done")[-1].unlink()
    report = verify(url)  # indistinguishable from a capture killed before its done flag: a warning, not a failure
    assert any("shards [1]: all data written but not marked done" in w for w in report.warnings), report.text()
    assert "warning: shards [1]" in report.text() and report.checks["shards_with_data_not_done"] == [1]
    import logging

    from qsae.jobs.rivalry import RivalryConfig, run_rivalry

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("qsae.lake").addHandler(handler)
    try:
        res = run_rivalry(RivalryConfig(store=url, n_perm=9, correctness=False))  # the analyses say so
    finally:
        logging.getLogger("qsae.lake").removeHandler(handler)
    assert any("are left out of this analysis" in r.getMessage() for r in records)
    g = res.summary["groups"]
    assert g["not_captured"] >= 2 and g["captured"]["n_done"] == g["captured"]["n_questions"] - g["not_captured"]
    assert "questions captured; the rest are not in this result" in res.to_text()  # never counted as left out


@pytest.mark.slow
def test_damaged_objects_are_reported_never_a_crash(good_lake, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tmp, cfg = good_lake
    url = _corrupt_copy(tmp, cfg, "truncated", lambda g: None)
    shard = _objects(url, "codes_val")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated shard
    resid = _objects(url, "resid")[0]
    data = bytearray(resid.read_bytes())
    data[len(data) // 3] ^= 0x10  # one flipped bit
    resid.write_bytes(bytes(data))
    empty = _objects(url, "completion_ids")[0]
    empty.write_bytes(b"")  # a zero-length object
    report = verify(url)
    text = "\n".join(report.problems)
    assert "codes_val/" in text and "does not decode" in text, text
    assert "resid/" in text and "checksum" in text, text
    assert "completion_ids/" in text and "empty (0 bytes)" in text, text
    assert report.checks["damaged_objects"] == 3 and "skipped" in report.checks["content_checks"]
    qsae = str(Path(sys.executable).parent / "qsae")
    out = subprocess.run([qsae, "verify", url, "--json"], capture_output=True, text=True)
    assert out.returncode == 1 and json.loads(out.stdout)["ok"] is False  # always JSON


def test_new_lakes_store_every_chunk_with_a_checksum(good_lake):
    _, cfg = good_lake
    g = zarr.open_group(cfg.store, mode="r")
    assert g.attrs["stores_every_chunk"] is True
    for name in ("resid", "codes_idx", "completion", "done", "prompt_truncated", "question"):
        codecs = str(g[name].metadata.codecs)
        assert "Crc32cCodec" in codecs, (name, codecs)
    # an all-fill region (no prompt was truncated) is stored too: a missing object is never "all fill"
    assert not g["prompt_truncated"][:].any() and _objects(cfg.store, "prompt_truncated")
