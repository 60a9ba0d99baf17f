"""Synthetic activations from a known sparse dictionary, written into a real token lake."""

from __future__ import annotations

import numpy as np

from qsae.lake.store import TokenLake, TokenLakeSpec


def sparse_dictionary_data(n_tokens=40_000, d_model=32, n_atoms=48, k_true=3, noise=0.01, seed=0):
    """x = sum of k_true random unit atoms with positive magnitudes (+ small noise)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d_model))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_atoms, k_true, replace=False) for _ in range(n_tokens)])
    mags = rng.exponential(1.0, size=(n_tokens, k_true)) + 0.5
    x = np.einsum("nk,nkd->nd", mags, atoms[idx]) + noise * rng.standard_normal((n_tokens, d_model))
    return x.astype(np.float32), atoms


def write_token_lake(url, x, block_tokens=2000, special_every=0, layer=7):
    n, d = x.shape
    lake = TokenLake.open_or_create(url, TokenLakeSpec(
        n_tokens=n, layers=[layer], d_model=d, block_tokens=block_tokens, resid_dtype="float32",
        lineage={"model": "synthetic", "model_revision": "0", "hook": "resid_post", "dataset": "synthetic",
                 "dataset_revision": "0", "context_length": 0, "bos": "none", "tokens_per_window": 0}),
        mode="overwrite")
    special = np.zeros(n, bool)
    if special_every:
        special[::special_every] = True
    for b in range(lake.n_shards):
        r = lake.shard_region(b)
        m = r.stop - r.start
        lake.write_shard(b, {
            "acts": x[None, r], "norm": np.linalg.norm(x[None, r], axis=-1),
            "overflow": np.zeros((1, m), np.uint16), "nonfinite": np.zeros((1, m), np.uint16),
            "token_id": np.zeros(m, np.int32), "doc": np.zeros(m, np.int32),
            "position": np.arange(m, dtype=np.int32), "special": special[r]})
    return TokenLake.open(url)
