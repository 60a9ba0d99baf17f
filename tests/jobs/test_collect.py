"""Token collection on SmolLM2: stored activations equal fresh forward passes; BOS handling; resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsae.jobs.collect import CollectConfig, collect
from qsae.lake.store import TokenLake
from qsae.lake.writer import ShardWriter
from qsae.lm.hooks import run_with_capture


def _cfg(tmp, name, **kw):
    base = dict(model="smollm2", layers=[3, 6], context_length=24, windows_per_batch=3, max_tokens=9 * 23,
                resid_dtype="float32", device="cpu", dtype="float32", store=str(tmp / name))
    base.update(kw)
    return CollectConfig(**base)


def test_collected_activations_equal_fresh_forward(tmp_path, smollm2):
    cfg = _cfg(tmp_path, "t.zarr")
    lake = TokenLake.open(collect(cfg, lm=smollm2).store)
    ds = lake.to_xarray().load()
    assert ds.done.all() and ds.sizes["token"] == 9 * 23  # BOS is fed but not stored
    assert (ds.position.values.reshape(9, 23) == np.arange(1, 24)).all()
    ids = ds.token_id.values.reshape(9, 23)
    bos = smollm2.tokenizer.bos_token_id
    for w in (0, 5):
        inputs = torch.tensor([[bos, *ids[w].tolist()]])
        _, cap = run_with_capture(smollm2.model, inputs, layers=[3, 6], stop_early=True)
        for li, layer in enumerate([3, 6]):
            np.testing.assert_allclose(ds.acts.values[li, w * 23:(w + 1) * 23], cap.resid[layer][0, 1:].numpy(),
                                       rtol=1e-4, atol=1e-3)
    eos = smollm2.tokenizer.eos_token_id
    assert (ds.special.values == (ds.token_id.values == eos)).all()
    assert ds.attrs["hook"] == "resid_post" and ds.attrs["bos"] == "prepend"
    assert ds.attrs["model_path"] == "smollm2"  # what reconstruction's model in the loop loads
    np.testing.assert_allclose(ds.norm.values, np.linalg.norm(ds.acts.values, axis=-1), rtol=1e-5)


def test_mlp_hook_and_no_bos(tmp_path, smollm2):
    cfg = _cfg(tmp_path, "mlp.zarr", hook="mlp_out", bos="none", layers=[4], max_tokens=3 * 24)
    ds = TokenLake.open(collect(cfg, lm=smollm2).store).to_xarray().load()
    ids = ds.token_id.values.reshape(3, 24)
    assert ds.special.values.reshape(3, 24)[:, 0].all()  # window start flagged without BOS
    _, cap = run_with_capture(smollm2.model, torch.tensor(ids[:1]), mlp_layers=[4], stop_early=True)
    np.testing.assert_allclose(ds.acts.values[0, :24], cap.mlp[4][0].numpy(), rtol=1e-4, atol=1e-3)


def test_interrupted_collection_resumes_to_the_same_store(tmp_path, smollm2, monkeypatch):
    full = TokenLake.open(collect(_cfg(tmp_path, "full.zarr"), lm=smollm2).store).to_xarray().load()
    real = ShardWriter.submit
    calls = []

    def crash_on_third(self, shard, data):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(self, shard, data)

    monkeypatch.setattr(ShardWriter, "submit", crash_on_third)
    cfg = _cfg(tmp_path, "cut.zarr")
    with pytest.raises(KeyboardInterrupt):
        collect(cfg, lm=smollm2)
    monkeypatch.undo()
    part = TokenLake.open(cfg.store)
    assert part.pending_shards() == [2]
    resumed = TokenLake.open(collect(cfg, lm=smollm2).store).to_xarray().load()
    for name in full.data_vars:
        np.testing.assert_array_equal(resumed[name].values, full[name].values, err_msg=name)
