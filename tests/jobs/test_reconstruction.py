"""Reconstruction metrics against independent numpy formulas; perfect/zero SAEs; splicing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsae.errors import SAEFormatError
from qsae.jobs.capture import run_capture
from qsae.jobs.collect import CollectConfig, collect
from qsae.jobs.reconstruction import (
    ReconstructionConfig,
    finish_reconstruction,
    loss_recovered,
    model_layer,
    offline_layer,
    plan_reconstruction,
    run_reconstruction,
    table_rows,
    text_windows,
)
from qsae.lake.store import QuestionLake, open_lake
from qsae.lm.hooks import decoder_layers, run_with_capture, splice
from qsae.sae.formats import load_sae
from qsae.sae.model import file_sha256

from ..helpers import random_shard, small_spec, tiny_capture, write_relu_checkpoint


def numpy_metrics(x, x_hat, val, d_sae, idx):
    """Independent reference of every offline metric (SAEBench formulas, corrected forms)."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    err = ((x - x_hat) ** 2).sum(1)
    centred = ((x - x.mean(0)) ** 2).sum(1)
    active = val != 0  # raw Qwen-Scope TopK codes may be negative: still active
    density = np.array([(idx[active] == f).sum() for f in range(d_sae)]) / x.shape[0]
    return {
        "mse": ((x - x_hat) ** 2).mean(),
        "mse_per_token": err.mean(),
        "fve": 1 - err.sum() / centred.sum(),
        "fve_legacy": (1 - err / centred).mean(),
        "cossim": np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x, x_hat)]),
        "l2_ratio": np.mean(np.linalg.norm(x_hat, axis=1) / np.linalg.norm(x, axis=1)),
        "relative_reconstruction_bias": (np.linalg.norm(x_hat, axis=1) ** 2).mean() / (x * x_hat).sum(1).mean(),
        "l0": active.sum(1).mean(),
        "l1": np.abs(val).sum(1).mean(),
        "dead_features": int((density == 0).sum()),
        "dense_features": int((density > 0.1).sum()),
    }, density


def test_offline_metrics_equal_numpy_reference(tmp_path):
    rng = np.random.default_rng(0)
    d_model, d_sae, k = 8, 40, 3
    W_enc = torch.randn(d_sae, d_model, generator=torch.Generator().manual_seed(1))
    W_dec = torch.randn(d_model, d_sae, generator=torch.Generator().manual_seed(2))
    b_dec = torch.randn(d_model) * 0.1
    sae_path = tmp_path / "layer3.sae.pt"
    torch.save({"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.zeros(d_sae), "b_dec": b_dec}, sae_path)
    sha = file_sha256(sae_path)
    spec = small_spec(n_questions=40, layers=(3,), n_samples=4, d_model=d_model, d_sae=d_sae, k=k, resid_dtype="float32",
                      lineage={"sae_source": str(sae_path), "sae_sha256": {"3": sha}})
    lake = QuestionLake.open_or_create(str(tmp_path / "lake.zarr"), spec)
    for shard in range(lake.n_shards - 1):  # the last shard stays undone: it must be ignored
        data = random_shard(lake, shard)
        data["resid_nonfinite"][:] = 0
        data["resid_prompt_nonfinite"][:] = 0
        idx = np.sort(np.stack([rng.choice(d_sae, k, replace=False) for _ in range(data["codes_idx"].size // k)]), 1)
        data["codes_idx"] = idx.reshape(data["codes_idx"].shape).astype(np.uint8)
        data["codes_val"] = (rng.exponential(1.0, data["codes_val"].shape) * (rng.random(data["codes_val"].shape) < 0.8)).astype(np.float32)
        lake.write_shard(shard, data)
    res = run_reconstruction(ReconstructionConfig(store=lake.url, block_questions=7))
    ds = open_lake(lake.url)
    done = ds.done.values
    # Each position is evaluated on its own rows and reported under its own label, never pooled.
    assert list(res.table.position.values) == ["prompt_end", "completion_end"]
    for label, x, idx, val, n in (
            ("completion_end", ds.resid.values[0][done].reshape(-1, d_model), ds.codes_idx.values[0][done].reshape(-1, k),
             ds.codes_val.values[0][done].reshape(-1, k), 32 * 4),
            ("prompt_end", ds.resid_prompt.values[0][done], ds.prompt_codes_idx.values[0][done],
             ds.prompt_codes_val.values[0][done], 32)):
        idx, val = idx.astype(int), val.astype(np.float64)
        x_hat = np.einsum("nk,dnk->nd", val, W_dec.double().numpy()[:, idx]) + b_dec.double().numpy()
        ref, density = numpy_metrics(x, x_hat, val, d_sae, idx)
        row = res.table.sel(layer=3, position=label)
        for name, value in ref.items():
            assert float(row[name]) == pytest.approx(value, rel=1e-6, abs=1e-9), (label, name)
        np.testing.assert_allclose(row.feature_density.values, density, rtol=1e-6)
        assert int(row.n_tokens) == x.shape[0] == n
    assert res.table.attrs["comparable_to_saebench"] is False and "near-duplicates" in res.table.attrs["positions"][
        "completion_end"]
    # The result renders itself: a table in words, a caution wherever a number misleads, JSON for machines.
    cautions = res.cautions()
    assert cautions  # random codes: negative FVE and too few firings to call a feature dead
    for r in res.rows():
        said = [c for c in cautions if c.startswith(f"layer 3 {r['position']}: ")]
        assert any("FVE" in c and "is negative" in c for c in said) == (r["fve"] < 0), (r, said)
        assert any("did not fire in these" in c for c in said) == (
            r["dead_features"] > 0 and r["n_tokens"] * r["l0"] < 10 * d_sae), (r, said)
    text = res.to_text()
    assert all(f"caution: {c}" in text for c in cautions) and "dead (of 40)" in text
    assert [(r["layer"], r["position"]) for r in json.loads(res.to_json())["rows"]] == [
        (3, "prompt_end"), (3, "completion_end")]
    only = run_reconstruction(ReconstructionConfig(store=lake.url, positions="completion"))
    assert list(only.table.position.values) == ["completion_end"]
    assert float(only.table.fve.sel(layer=3, position="completion_end")) == pytest.approx(float(
        res.table.fve.sel(layer=3, position="completion_end")), rel=1e-12)  # other blocks: float sums reorder
    stored = open_lake(lake.url, group="reconstruction")
    assert stored.attrs["lineage"]["sae_sha256"] == {"3": sha} and "fve_legacy" in stored
    assert open(res.figure, "rb").read(4) == b"\x89PNG"
    # The lake's lineage pins the SAE file: another file at the same path is refused.
    torch.save({"W_enc": W_enc * 2, "W_dec": W_dec, "b_enc": torch.zeros(d_sae), "b_dec": b_dec}, sae_path)
    with pytest.raises(SAEFormatError, match="not the same file"):
        run_reconstruction(ReconstructionConfig(store=lake.url))


def identity_sae(folder, d, layers):
    """A TopK SAE with x_hat == x exactly: features [x, -x] through ReLU, k = d."""
    folder.mkdir(parents=True, exist_ok=True)
    eye = torch.eye(d)
    for layer in layers:
        torch.save({"W_enc": torch.cat([eye, -eye]), "W_dec": torch.cat([eye, -eye], 1),
                    "b_enc": torch.zeros(2 * d), "b_dec": torch.zeros(d)}, folder / f"layer{layer}.sae.pt")
    return folder


def zero_sae(folder, d, layers):
    folder.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        torch.save({"W_enc": torch.randn(2 * d, d), "W_dec": torch.zeros(d, 2 * d),
                    "b_enc": torch.zeros(2 * d), "b_dec": torch.zeros(d)}, folder / f"layer{layer}.sae.pt")
    return folder


@pytest.fixture(scope="module")
def perfect_lake(tmp_path_factory, tiny_qwen_dir):
    tmp = tmp_path_factory.mktemp("recon")
    sae = identity_sae(tmp / "identity", 64, [1, 2])
    cfg = tiny_capture(tiny_qwen_dir, sae, tmp / "lake.zarr", sae_k=64, limit=4, n_samples=2, questions_per_shard=4,
                       questions_per_batch=4, resid_dtype="float32")
    run_capture(cfg)
    return tmp, cfg


def test_perfect_sae_gives_fve_cosine_and_loss_recovered_one(perfect_lake, tiny_qwen_dir):
    tmp, cfg = perfect_lake
    res = run_reconstruction(ReconstructionConfig(store=cfg.store, model_in_loop=True, max_tokens=256,
                                                  context_length=32, text_dataset="wiki-demo"))
    for layer in (1, 2):
        for position in ("prompt_end", "completion_end"):
            row = res.table.sel(layer=layer, position=position)
            assert float(row.fve) == pytest.approx(1.0, abs=1e-9)
            assert float(row.fve_legacy) == pytest.approx(1.0, abs=1e-9)
            assert float(row.cossim) == pytest.approx(1.0, abs=1e-6)
            assert float(row.mse) == pytest.approx(0.0, abs=1e-12)
        row = res.table.sel(layer=layer)
        assert float(row.loss_recovered) == pytest.approx(1.0, abs=1e-9)
        assert float(row.kl_div_score) == pytest.approx(1.0, abs=1e-9)
        assert float(row.kl_sae) == pytest.approx(0.0, abs=1e-9)
        assert float(row.ce_zero) != float(row.ce_clean) and float(row.kl_zero) > 0  # ratio is defined


def test_zero_sae_gives_loss_recovered_zero(tiny_qwen, tmp_path):
    sae = load_sae(zero_sae(tmp_path / "zero", 64, [1]), layer=1, k=8)
    windows, keep = text_windows(tiny_qwen, ReconstructionConfig(max_tokens=256, context_length=32))
    res = loss_recovered(tiny_qwen.model, sae, 1, windows, keep)
    assert res.ce_sae == pytest.approx(res.ce_zero) and res.loss_recovered == pytest.approx(0.0, abs=1e-9)
    assert res.kl_zero > 0 and res.n_tokens == int((keep[:, :-1] & keep[:, 1:]).sum())


def test_splice_replaces_the_residual(tiny_qwen):
    model = tiny_qwen.model
    ids = torch.tensor([tiny_qwen.tokenizer("Q: Who wrote Hamlet?\nA:").input_ids])
    last = len(decoder_layers(model)) - 1
    with torch.inference_mode():
        clean = model(ids).logits
        with splice(model, last, lambda x: 0.5 * x):
            halved = model(ids).logits
        _, cap = run_with_capture(model, ids, layers=[last], stop_early=False)
        manual = model.lm_head(model.model.norm(0.5 * cap.resid[last]))
        with splice(model, 1, lambda x: x + 1.0):
            shifted = model(ids).logits
    torch.testing.assert_close(halved, manual)
    assert not torch.allclose(halved, clean) and not torch.allclose(shifted, clean)
    with torch.inference_mode():  # the hook is gone afterwards
        torch.testing.assert_close(model(ids).logits, clean)


def test_fve_legacy_is_never_nan_when_a_token_equals_the_mean():
    """One token exactly at the mean has no per-token ratio: it is left out and counted, the
    layer's fve_legacy stays the mean over the others (it was NaN for the whole layer)."""
    from qsae.sae.metrics import ReconAccumulator

    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # mean (0, 0): the third token equals it
    x_hat = np.array([[0.5, 0.0], [-1.0, 0.5], [0.1, 0.0]])
    acc = ReconAccumulator(4, x.mean(0))
    acc.add(x, x_hat, np.array([[0], [1], [2]]), np.array([[1.0], [1.0], [1.0]]))
    m = acc.metrics(2)
    assert m["fve_legacy"] == pytest.approx(((1 - 0.25 / 1) + (1 - 0.25 / 1)) / 2)
    assert m["fve_legacy_tokens_left_out"] == 1
    assert m["fve"] == pytest.approx(1 - (0.25 + 0.25 + 0.01) / 2)


@pytest.fixture(scope="module")
def mlp_token_lake(tmp_path_factory, smollm2):
    """A token lake of text at SmolLM2's layer-4 MLP output (the hook the 9B release's SAE reads)."""
    tmp = tmp_path_factory.mktemp("tokens")
    cfg = CollectConfig(model="smollm2", hook="mlp_out", layers=[4], context_length=24, windows_per_batch=3,
                        max_tokens=6 * 23, resid_dtype="float32", device="cpu", dtype="float32",
                        store=str(tmp / "mlp.zarr"))
    collect(cfg, lm=smollm2)
    return tmp, cfg.store


def test_token_lake_gives_saebench_core_metrics_with_a_relu_mlp_sae(mlp_token_lake, smollm2):
    """SAEBench's setting: every non-special text token through the SAE (here ReLU, at the MLP
    output), against a dense numpy reference; kl_div_score by its definition."""
    tmp, store = mlp_token_lake
    d = smollm2.model.config.hidden_size
    path = write_relu_checkpoint(tmp / "relu.pt", d, 2 * d, seed=3)
    cfg = ReconstructionConfig(store=store, sae=str(path), block_tokens=50, model_in_loop=True, max_tokens=96,
                               context_length=32)
    plan = plan_reconstruction(cfg)
    assert plan.kind == "tokens" and plan.labels == ["token"]
    res = finish_reconstruction(plan, [offline_layer(plan, 4)], [model_layer(plan, 4, smollm2)])
    ds = open_lake(store).load()
    keep = ds.done.values & ~ds.special.values
    assert 0 < keep.sum() < keep.size  # BOS-less window starts / EOS are left out
    x = ds.acts.values[0][keep].astype(np.float64)
    sd = torch.load(path)["model_state_dict"]
    W_e, b_e, W_d, b = (sd[n].double().numpy() for n in ("encoder.weight", "encoder.bias", "decoder.weight", "bias"))
    z = np.maximum((x - b) @ W_e.T + b_e, 0)
    x_hat = z @ W_d.T + b
    width = int((z > 0).sum(1).max())
    idx = np.argsort(-z, axis=1)[:, :width]
    ref, density = numpy_metrics(x, x_hat, np.take_along_axis(z, idx, 1), 2 * d, idx)
    row = res.table.sel(layer=4, position="token")
    for name, value in ref.items():
        assert float(row[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    np.testing.assert_allclose(row.feature_density.values, density, rtol=1e-6)
    assert float(row.l0) > 1  # a ReLU SAE's L0 is whatever fires, not a fixed k
    kl_sae, kl_zero = float(res.table.kl_sae.sel(layer=4)), float(res.table.kl_zero.sel(layer=4))
    assert kl_zero > 0 and float(res.table.kl_div_score.sel(layer=4)) == pytest.approx((kl_zero - kl_sae) / kl_zero)
    assert int(row.n_tokens) == keep.sum() and int(res.table.model_tokens_scored.sel(layer=4)) > 0  # both kept
    rows = table_rows(res.table)
    assert rows[0]["position"] == "token" and rows[0]["n_tokens"] == keep.sum() and "kl_div_score" in rows[0]
    stored = open_lake(store, group="reconstruction")
    assert stored.attrs["comparable_to_saebench"] is True and stored.attrs["lake_kind"] == "tokens"
    assert stored.attrs["lineage"]["sae_sha256"]["4"] == file_sha256(path)
    # The identity ReLU SAE spliced in at the MLP output changes nothing; zero-ablation does.
    ident = write_relu_checkpoint(tmp / "identity.pt", d, 2 * d, identity=True)
    perfect = model_layer(plan_reconstruction(cfg.model_copy(update={"sae": str(ident)})), 4, smollm2)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6) and perfect["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_token_lake_needs_its_sae_and_the_sae_must_read_its_hook(mlp_token_lake, tmp_path, smollm2):
    _, store = mlp_token_lake
    with pytest.raises(SAEFormatError, match="token lake: it holds no codes"):
        run_reconstruction(ReconstructionConfig(store=store))
    d = smollm2.model.config.hidden_size
    resid_sae = tmp_path / "resid"
    resid_sae.mkdir()
    torch.save({"W_enc": torch.randn(2 * d, d), "W_dec": torch.randn(d, 2 * d), "b_enc": torch.zeros(2 * d),
                "b_dec": torch.zeros(d)}, resid_sae / "layer4.sae.pt")
    with pytest.raises(SAEFormatError, match="reads resid_post, the token lake holds mlp_out"):
        run_reconstruction(ReconstructionConfig(store=store, sae=str(resid_sae), sae_k=8))
