"""SAE training from a token lake: recovery, metrics, dead latents, exact resume, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsae.jobs.train import (
    DeadFeatureTracker,
    LakeSource,
    Metrics,
    ShuffledStream,
    TrainableSAE,
    TrainConfig,
    train_sae,
)
from qsae.sae.formats import load_sae

from .helpers import sparse_dictionary_data, write_token_lake


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
    stream = ShuffledStream(LakeSource(lake, 7), cfg.batch_size, cfg.buffer_blocks, cfg.seed)
    n_last = cfg.dead_tokens // cfg.batch_size
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
        train_sae(cut, log_fn=crash_after_80)
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
        torch.testing.assert_close(ours(batch), trained(batch / scale)[0] * scale, rtol=1e-5, atol=1e-4)


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
