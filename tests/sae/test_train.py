"""SAE training from a token lake: recovery, metrics, dead latents, exact resume, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsae.jobs.train import LakeSource, TrainConfig, train_sae
from qsae.sae.formats import load_sae
from qsae.sae.trainable import TrainableSAE
from qsae.sae.training import DeadFeatureTracker, Metrics, ShuffledStream

from ..helpers import sparse_dictionary_data, write_token_lake


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syn")
    x, atoms = sparse_dictionary_data()
    lake = write_token_lake(str(tmp / "tokens.zarr"), x)
    return tmp, lake, x, atoms


def _cfg(tmp, name, **kw):
    base = dict(store=str(tmp / "tokens.zarr"), d_sae=96, batch_size=256, epochs=4, out=str(tmp / name),
                resume=False, log_every=100, dead_tokens=20_000, aux_k=32, lr=2e-3, k=3)
    base.update(kw)
    return TrainConfig(**base)


def test_topk_recovers_the_planted_dictionary(synthetic):
    tmp, _, _, atoms = synthetic
    res = train_sae(_cfg(tmp, "topk"))
    sae = load_sae(res.out)
    dec = sae.W_dec.numpy()
    dec = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    best = (atoms @ dec.T).max(axis=1)
    assert best.mean() > 0.9, best
    assert res.final["l0"] == pytest.approx(3.0)
    assert res.final["fve"] > 0.9


def test_relu_l1_reaches_explained_variance(synthetic):
    tmp, _, _, _ = synthetic
    res = train_sae(_cfg(tmp, "relu", architecture="relu", l1_coefficient=0.005))
    assert res.final["fve"] > 0.9
    sae = load_sae(res.out)
    assert sae.info.activation == "relu" and sae.k is None


def test_logged_metrics_match_numpy_on_a_batch():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((50, 8)))
    x_hat = x + 0.1 * torch.from_numpy(rng.standard_normal((50, 8)))
    z = torch.from_numpy((rng.random((50, 20)) < 0.2).astype(float))
    m = Metrics()
    m.add(x[:20], x_hat[:20], z[:20], 1.0)
    m.add(x[20:], x_hat[20:], z[20:], 3.0)
    s = m.summary(8)
    xn, en = x.numpy(), (x - x_hat).numpy()
    assert s["fve"] == pytest.approx(1 - (en**2).sum() / ((xn - xn.mean(0)) ** 2).sum())
    assert s["mse"] == pytest.approx((en**2).mean())
    assert s["l0"] == pytest.approx(z.numpy().sum(1).mean())
    assert s["loss"] == pytest.approx(2.0)


def test_dead_features_counted_on_a_planted_case():
    t = DeadFeatureTracker(6, dead_tokens=100)
    for _ in range(3):  # latents 0 and 1 fire every batch; 5 fires once at the start
        t.update(torch.tensor([True, True, False, False, False, _ == 0]), 40)
    # 120 tokens seen: 2, 3, 4 never fired (120 > 100); 5 last fired 80 tokens ago
    assert t.dead_mask().tolist() == [False, False, True, True, True, False]
    t.update(torch.tensor([False] * 6), 40)
    assert t.n_dead == 4  # latent 5 now 120 tokens without firing


def test_trainer_dead_count_equals_replayed_firing(tmp_path):
    # Planted: every token is one of two points (+ tiny noise), so with k=1 and a learning
    # rate ~0 only a couple of latents can ever win; the other ~94 are dead.
    rng = np.random.default_rng(3)
    _, atoms = sparse_dictionary_data(n_tokens=10)
    x = (3 * atoms[rng.integers(0, 2, 30_000)] + 1e-3 * rng.standard_normal((30_000, 32))).astype(np.float32)
    lake = write_token_lake(str(tmp_path / "tokens.zarr"), x)
    cfg = _cfg(tmp_path, "deadplant", epochs=1, aux_coefficient=0.0, lr=1e-12, k=1)
    res = train_sae(cfg)
    sae = load_sae(res.out)
    # Dead = not fired in the last dead_tokens tokens: with 256-token batches that is the
    # last 78 batches (78 * 256 = 19968 <= 20000 < 79 * 256). Replay exactly those batches.
    stream = ShuffledStream(LakeSource(lake, 7), cfg.batch_size, cfg.buffer_blocks, cfg.trainer.seed)
    n_last = cfg.trainer.dead_tokens // cfg.batch_size
    it = stream.batches(res.steps - n_last)
    fired = torch.zeros(96, dtype=torch.bool)
    for _ in range(n_last):
        fired |= (sae.encode(torch.from_numpy(next(it))) > 0).any(0)
    it.close()
    assert 80 < int((~fired).sum()) == res.final["dead"]


def test_shuffle_is_bounded_complete_and_skips_special(tmp_path):
    x = np.arange(10_000, dtype=np.float32)[:, None].repeat(4, 1)
    lake = write_token_lake(str(tmp_path / "t.zarr"), x, block_tokens=1000, special_every=10)
    stream = ShuffledStream(LakeSource(lake, 7), batch_size=900, buffer_blocks=3, seed=1)
    assert stream.rows_per_epoch == 9000
    it = stream.batches(0)
    rows = np.concatenate([next(it)[:, 0] for _ in range(10)])  # exactly one epoch
    it.close()
    assert sorted(rows.astype(int)) == [i for i in range(10_000) if i % 10]  # each valid row once
    # batches 0..2 come from the first buffer of 3 blocks only (bounded shuffle)
    first = rows[:2700].astype(int) // 1000
    assert len(set(first)) <= 3
    again = stream.batches(4)
    np.testing.assert_array_equal(next(again)[:, 0], rows[3600:4500])  # resume mid-epoch
    again.close()


def test_resumed_training_equals_uninterrupted(synthetic):
    tmp, _, _, _ = synthetic
    full = train_sae(_cfg(tmp, "full", epochs=1, checkpoint_every=40))

    class Crash(Exception):
        pass

    def crash_after_80(entry):
        if entry["step"] == 80:
            raise Crash

    cut = _cfg(tmp, "resumed", epochs=1, checkpoint_every=40, log_every=20)
    with pytest.raises(Crash):
        train_sae(cut, on_log=crash_after_80)
    resumed = train_sae(cut.model_copy(update={"resume": True}))
    assert resumed.steps == full.steps
    a = load_sae(full.out)
    b = load_sae(resumed.out)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    with pytest.raises(ValueError, match="another training config"):
        train_sae(cut.model_copy(update={"resume": True, "k": 4}))


def test_export_loads_in_qsae_and_saelens_identically(synthetic):
    from sae_lens import SAE as LensSAE

    tmp, _, x, _ = synthetic
    res = train_sae(_cfg(tmp, "export", epochs=1))
    cfg = json.loads((res.out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_in"] == 32 and cfg["d_sae"] == 96
    assert cfg["metadata"]["hook_name"] == "blocks.7.hook_resid_post"
    ours = load_sae(res.out)
    assert (ours.info.layer, ours.info.hook, ours.k) == (7, "resid_post", 3)
    lens = LensSAE.load_from_disk(res.out)
    batch = torch.from_numpy(x[:500])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(batch), lens.encode(batch), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(batch), lens(batch), rtol=1e-5, atol=1e-4)
    # The export folds the input scale in: on raw activations it equals scale * the trained
    # model (final checkpoint) applied to x / scale.
    ckpt = torch.load(res.out / "checkpoints" / "latest.pt", weights_only=True)
    trained = TrainableSAE(32, 96, "topk", 3, torch.Generator())
    trained.load_state_dict(ckpt["sae"])
    scale = ckpt["scale"]
    assert cfg["qsae_training"]["input_scale"] == pytest.approx(scale)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), trained(batch / scale).x_hat * scale, rtol=1e-5, atol=1e-4)
        # to_inference is the same function as the export, in memory
        from qsae.sae.trainable import InputScaler

        frozen = trained.to_inference(InputScaler(scale))
        torch.testing.assert_close(frozen.encode(batch), ours.encode(batch))
        torch.testing.assert_close(frozen(batch), ours(batch))


def test_init_from_continues_an_exported_sae(synthetic):
    tmp, _, x, _ = synthetic
    first = train_sae(_cfg(tmp, "init-src", epochs=1))
    # lr ~0: the continued SAE must be the same function as the one it started from
    cont = train_sae(_cfg(tmp, "init-cont", epochs=1, lr=1e-12, d_sae=None, init_from=str(first.out)))
    a, b = load_sae(first.out), load_sae(cont.out)
    assert b.d_sae == 96  # the width comes from the initial SAE
    batch = torch.from_numpy(x[:300])
    with torch.no_grad():
        torch.testing.assert_close(b.encode(batch), a.encode(batch), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b(batch), a(batch), rtol=1e-4, atol=1e-3)


def test_auxk_is_normalised_by_the_variance_of_the_residual_error():
    """Gao et al. / sparsify: ||e - e_hat||^2 / ||e - mean(e)||^2 over the batch, so scaling the
    error (and the decoder with it) leaves it unchanged; a plain mean would scale with c^2."""
    from qsae.sae.trainable import auxk_loss

    g = torch.Generator().manual_seed(0)
    err, pre, W_dec = torch.randn(64, 8, generator=g), torch.randn(64, 20, generator=g), torch.randn(20, 8, generator=g)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4, 7, 9, 15]] = True
    got = auxk_loss(err, pre, dead, W_dec, aux_k=3)
    z = torch.zeros_like(pre)
    for r in range(64):  # by hand: each row's 3 largest dead pre-activations, ReLU'd
        cand = [(float(pre[r, j]), j) for j in range(20) if dead[j]]
        for v, j in sorted(cand, reverse=True)[:3]:
            z[r, j] = max(v, 0.0)
    e_hat = z @ W_dec
    ref = ((err - e_hat) ** 2).sum() / ((err - err.mean(0)) ** 2).sum()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(auxk_loss(10 * err, pre, dead, 10 * W_dec, aux_k=3), ref)
    assert auxk_loss(err, pre, dead, W_dec, aux_k=5) < auxk_loss(err, pre, dead, W_dec, aux_k=1) * 10  # defined


def test_init_from_folds_the_source_pre_encoder_bias_into_b_enc():
    """A Qwen-Scope SAE encodes x @ W_enc + b_enc (b_pre = 0, b_dec != 0): the trainer starts
    from the same pre-activations; a 9B-release ReLU SAE (free decoder norms) from the same
    function."""
    from qsae.sae.formats import load_sae_file
    from qsae.sae.trainable import InputScaler

    from ..helpers import qwen_scope_dict, write_relu_checkpoint

    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3)) * 4
    scale = 2.5
    src = load_sae_file_from_dict(qwen_scope_dict(d_model=16, d_sae=64), k=8)
    assert float(src.b_dec.abs().sum()) > 0 and float(src.b_pre.abs().sum()) == 0
    sae = TrainableSAE(16, 64, "topk", 8, torch.Generator().manual_seed(0))
    sae.load_from(src, InputScaler(scale))
    with torch.no_grad():
        torch.testing.assert_close(sae.pre(x / scale), src.pre_activations(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sae.codes(sae.pre(x / scale)), src.encode(x), rtol=1e-5, atol=1e-4)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = write_relu_checkpoint(Path(d) / "relu.pt", 16, 64, seed=2)
        relu = load_sae_file(path, layer=None)
    relu.W_dec.data *= torch.linspace(0.5, 2.0, 64)[:, None]  # free decoder norms, as the release trains
    sae = TrainableSAE(16, 64, "relu", 8, torch.Generator().manual_seed(0))
    sae.load_from(relu, InputScaler(scale))
    with torch.no_grad():
        torch.testing.assert_close(sae(x / scale)[0] * scale, relu(x), rtol=1e-5, atol=1e-4)


def load_sae_file_from_dict(d, k):
    import tempfile
    from pathlib import Path

    from qsae.sae.formats import load_sae_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer0.sae.pt"
        torch.save(d, path)
        return load_sae_file(path, k=k)


def test_l1_in_raw_units_is_the_releases_trade_off(tmp_path):
    """With l1_units="scaled" training does not depend on the data's scale; with "raw" it does,
    as the 9B release's loss on raw activations does; loss_raw is that loss on the window."""
    x, _ = sparse_dictionary_data(n_tokens=4096, d_model=16, n_atoms=24)
    runs = {}
    for c in (1.0, 30.0):
        store = str(tmp_path / f"x{c:g}.zarr")
        write_token_lake(store, x * c)
        for units in ("scaled", "raw"):
            cfg = TrainConfig(store=store, architecture="relu", d_sae=48, batch_size=512, epochs=6, lr=5e-3,
                              l1_coefficient=0.5, l1_units=units, out=str(tmp_path / f"{units}{c:g}"), resume=False,
                              log_every=4)
            runs[units, c] = train_sae(cfg).final
    assert runs["scaled", 1.0]["l0"] == pytest.approx(runs["scaled", 30.0]["l0"], rel=1e-3)
    assert runs["raw", 30.0]["l0"] > 1.5 * runs["raw", 1.0]["l0"]  # λ weighs less against a 900x MSE
    for f in runs.values():
        assert f["loss_raw"] == pytest.approx(f["mse"] + 0.5 * f["l1"])
