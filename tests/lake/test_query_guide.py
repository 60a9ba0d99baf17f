"""The accessor against direct numpy on the raw arrays; laziness; the guide's code runs."""

from __future__ import annotations

import re
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from zarr.storage import LocalStore, WrapperStore

import qsae  # registers ds.qsae
from qsae.jobs.codes import decoder
from qsae.sae.formats import load_sae

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "query-guide.md"


@pytest.fixture(scope="module")
def lake(captured):
    return captured(d_sae=300, sae_scale=3.0, sae_k=8, limit=12, n_samples=4, max_new_tokens=5, questions_per_shard=4,
                    questions_per_batch=4)


def dense_codes(idx, val, d_sae):
    """Independent reference: scatter the codes into a dense (..., d_sae) array."""
    out = np.zeros(idx.shape[:-1] + (d_sae,))
    np.put_along_axis(out, idx.astype(np.int64), val, axis=-1)
    return out


def test_accessor_results_equal_numpy_on_raw_arrays(lake):
    ds = xr.open_zarr(lake.store)
    raw = ds.load()
    d_sae = ds.attrs["d_sae"]
    dense = dense_codes(raw.codes_idx.values, raw.codes_val.values, d_sae)  # (layer, q, s, d_sae)
    feats = [int(raw.codes_idx.values[1, 0, 0, 0]), 5, int(raw.codes_idx.values[1, 3, 2, 4])]
    act = ds.qsae.feature_activation(feats, layer=2).compute()
    np.testing.assert_allclose(act.values, dense[1][..., feats], rtol=1e-6)
    freq = ds.qsae.firing_frequency().compute()
    np.testing.assert_allclose(freq.values, (dense > 0).reshape(2, -1, d_sae).mean(1), rtol=1e-12)
    top = ds.qsae.top_questions(feats[0], layer=2, n=4)
    flat = dense[1][..., feats[0]].reshape(-1)
    order = np.argsort(-flat, kind="stable")[:4]
    assert list(top.activation) == pytest.approx(list(flat[order]), rel=1e-6)
    assert [(r.question, r.sample) for r in top.itertuples()] == [(int(raw.question[i // 4]), i % 4) for i in order]
    assert top.completion.iloc[0] == str(raw.completion.values[order[0] // 4, order[0] % 4])
    pidx, pval = raw.prompt_codes_idx.values[1], raw.prompt_codes_val.values[1]
    pfeat = int(pidx[pval > 0][0])
    prompt_top = ds.qsae.top_questions(pfeat, layer=2, n=2, which="prompt")
    pdense = dense_codes(pidx, pval, d_sae)[:, pfeat]
    assert pdense.max() > 0 and prompt_top.activation.iloc[0] == pytest.approx(pdense.max())
    assert prompt_top.question.iloc[0] == int(raw.question[np.argmax(pdense)])
    e = raw.entropy.values
    sel = ds.qsae.select(entropy=(float(np.median(e)), None), correct="none")
    want = (e >= np.median(e)) & ~raw.correct.values.any(1)
    assert list(sel.question.values) == list(raw.question.values[want])
    sae = load_sae(lake.sae, layer=2, k=8)
    x_hat = qsae.reconstruct(ds, layer=2).compute()
    ref = dense[1] @ sae.W_dec.double().numpy() + sae.b_dec.double().numpy()
    np.testing.assert_allclose(x_hat.values, ref, rtol=1e-4, atol=1e-4)


class CountingStore(WrapperStore):
    def __init__(self, store):
        super().__init__(store)
        self.reads = []

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None and not key.endswith("zarr.json"):
            self.reads.append((key, len(buf)))
        return buf


def test_accessor_stays_lazy_until_computed(lake):
    store = CountingStore(LocalStore(lake.store, read_only=True))
    ds = xr.open_zarr(store)
    store.reads.clear()
    act = ds.qsae.feature_activation([1, 2], layer=2)
    freq = ds.qsae.firing_frequency(layer=1)
    x_hat = ds.qsae.reconstruct(decoder(ds, 2), layer=2)
    assert isinstance(act.data, da.Array) and isinstance(freq.data, da.Array) and isinstance(x_hat.data, da.Array)
    assert store.reads == []  # nothing but metadata read so far
    act.compute()
    keys = {k.split("/")[0] for k, _ in store.reads}
    assert keys <= {"codes_idx", "codes_val"}  # the codes of that layer only, never resid


def test_query_guide_code_runs(lake):
    text = GUIDE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 8
    code = "\n".join(blocks)
    assert 'LAKE = "storage/lakes/demo.zarr"' in code and "LAYER = 15" in code
    code = code.replace('LAKE = "storage/lakes/demo.zarr"', f"LAKE = {lake.store!r}").replace("LAYER = 15", "LAYER = 2")
    namespace: dict = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 - our own documentation
    assert "freq_on_cluster" in namespace and "only_amb" in namespace
