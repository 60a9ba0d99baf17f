"""Reconstruction metrics against independent numpy formulas; perfect/zero SAEs; splicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsae.errors import SAEFormatError
from qsae.jobs.capture import run_capture
from qsae.jobs.reconstruction import ReconstructionConfig, run_reconstruction, text_windows
from qsae.lake.store import QuestionLake, open_lake
from qsae.lm.hooks import decoder_layers, run_with_capture, splice
from qsae.sae.formats import load_sae
from qsae.sae.metrics import loss_recovered
from qsae.sae.model import file_sha256

from .helpers import random_shard, small_spec, tiny_capture


def numpy_metrics(x, x_hat, val, d_sae, idx):
    """Independent reference of every offline metric (SAEBench formulas, corrected forms)."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    err = ((x - x_hat) ** 2).sum(1)
    centred = ((x - x.mean(0)) ** 2).sum(1)
    active = val > 0
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
    res = run_reconstruction(ReconstructionConfig(store=lake.url, positions="completion", block_questions=7))
    ds = open_lake(lake.url)
    done = ds.done.values
    x = ds.resid.values[0][done].reshape(-1, d_model)
    idx = ds.codes_idx.values[0][done].reshape(-1, k).astype(int)
    val = ds.codes_val.values[0][done].reshape(-1, k).astype(np.float64)
    x_hat = np.einsum("nk,dnk->nd", val, W_dec.double().numpy()[:, idx]) + b_dec.double().numpy()
    ref, density = numpy_metrics(x, x_hat, val, d_sae, idx)
    for name, value in ref.items():
        assert float(res.table[name].sel(layer=3)) == pytest.approx(value, rel=1e-6, abs=1e-9), name
    np.testing.assert_allclose(res.table.feature_density.sel(layer=3).values, density, rtol=1e-6)
    assert int(res.table.n_tokens.sel(layer=3)) == x.shape[0] == 32 * 4
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
        row = res.table.sel(layer=layer)
        assert float(row.fve) == pytest.approx(1.0, abs=1e-9)
        assert float(row.fve_legacy) == pytest.approx(1.0, abs=1e-9)
        assert float(row.cossim) == pytest.approx(1.0, abs=1e-6)
        assert float(row.mse) == pytest.approx(0.0, abs=1e-12)
        assert float(row.loss_recovered) == pytest.approx(1.0, abs=1e-9)
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
