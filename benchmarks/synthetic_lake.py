"""A full-size synthetic code lake for benchmarks: Q questions x 20 samples x k=50 TopK codes
over 32,768 features (only codes, entropy, text and done are filled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qsae.lake.store import LakeLayout, LakeSpec, QuestionLake, consolidate

S, K, D_SAE = 20, 50, 32768


def _partial(lake: QuestionLake) -> None:
    """This synthetic lake fills only some arrays: it says so, so the analyses' check that every
    chunk of a done question is stored (``stores_every_chunk``) does not apply to it."""
    del lake.group.attrs["stores_every_chunk"]
    consolidate(lake.ref)


def uniform_rows(rng, n):
    """Each sample's 50 features drawn from all 32,768 without repeats (sorted)."""
    keys = rng.random((n * S, D_SAE), dtype=np.float32) if n * S <= 4096 else None
    if keys is not None:
        return np.sort(np.argpartition(keys, K, axis=1)[:, :K], axis=1).reshape(n, S, K).astype(np.uint16)
    out = np.empty((n, S, K), np.uint16)
    for i in range(n):
        for s in range(S):
            out[i, s] = np.sort(rng.choice(D_SAE, K, replace=False))
    return out


def pooled_rows(rng, n):
    """Each question's samples draw their 50 features from a 150-feature pool of its own."""
    pools = np.stack([rng.choice(D_SAE, 150, replace=False) for _ in range(n)])
    pick = np.argsort(rng.random((n, S, 150)), axis=-1)[..., :K]
    return np.sort(np.take_along_axis(pools[:, None, :].repeat(S, 1), pick, axis=-1), axis=-1).astype(np.uint16)


def zipf_rows(rng, n, exponent=0.9, block=256):
    """Each row's 50 features drawn without repeats with probability ~ rank^-exponent (Gumbel
    top-k): a few features fire in a large share of rows, most rarely, as an SAE's do."""
    logw = -exponent * np.log(np.arange(1, D_SAE + 1))
    out = np.empty((n, K), np.uint16)
    for s in range(0, n, block):
        g = logw + rng.gumbel(size=(min(block, n - s), D_SAE))
        out[s:s + block] = np.sort(np.argpartition(-g, K, axis=1)[:, :K], axis=1)
    return out


def build_prompt_lake(root: Path, n: int, seed: int = 0, shard: int = 512) -> str:
    """A lake for the paper protocol: Zipf-popular prompt-end codes, and completions whose
    first words take 1..20 distinct values per question (first-word entropy spread over
    [0, 1]); the per-sample codes repeat the prompt codes (the paper protocol does not read them)."""
    rng = np.random.default_rng(seed)
    lineage = dict(model="bench", model_revision="0", hook="resid_post", sae_source="bench", sae_sha256={"20": "x"},
                   dataset="bench", dataset_revision="0", sampling={}, seed=0, prompt_template="")
    spec = LakeSpec(np.arange(n), [20], S, 8, 4, D_SAE, K, "float16", LakeLayout(shard, 4), lineage)
    url = str(root / "prompt.zarr")
    lake = QuestionLake.open_or_create(url, spec, mode="overwrite")
    _partial(lake)
    for sh in range(lake.n_shards):
        r = lake.shard_region(sh)
        m = r.stop - r.start
        idx = zipf_rows(rng, m)
        val = rng.exponential(1.0, (m, K)).astype(np.float32)
        lake.arrays["prompt_codes_idx"][:, r] = idx[None]
        lake.arrays["prompt_codes_val"][:, r] = val[None]
        lake.arrays["codes_idx"][:, r] = np.repeat(idx[:, None], S, 1)[None]
        lake.arrays["codes_val"][:, r] = np.repeat(val[:, None], S, 1)[None]
        words = rng.integers(1, S + 1, m)
        lake.arrays["completion"][r] = np.array([[f"w{s % w} answer" for s in range(S)] for w in words])
        ids = np.full((m, S, 4), -1, np.int32)
        ids[..., 0] = np.arange(S)[None] % words[:, None]
        lake.arrays["completion_ids"][r] = ids
        lake.arrays["entropy"][r] = rng.uniform(0, 5, m)
        lake.arrays["first_logprob"][r] = -rng.exponential(1.0, (m, S)).astype(np.float32)
        lake.arrays["question_text"][r] = np.array([f"question {i}" for i in range(r.start, r.stop)])
        lake.arrays["done"][r] = True
    return url


def build_code_lake(root: Path, n: int, kind: str = "uniform", seed: int = 0, shard: int = 256) -> str:
    rng = np.random.default_rng(seed)
    lineage = dict(model="bench", model_revision="0", hook="resid_post", sae_source="bench", sae_sha256={"20": "x"},
                   dataset="bench", dataset_revision="0", sampling={}, seed=0, prompt_template="")
    spec = LakeSpec(np.arange(n), [20], S, 8, 4, D_SAE, K, "float16", LakeLayout(shard, 4), lineage)
    url = str(root / f"{kind}.zarr")
    lake = QuestionLake.open_or_create(url, spec, mode="overwrite")
    _partial(lake)
    for sh in range(lake.n_shards):
        r = lake.shard_region(sh)
        m = r.stop - r.start
        idx = uniform_rows(rng, m) if kind == "uniform" else pooled_rows(rng, m)
        lake.arrays["codes_idx"][:, r] = idx[None]
        lake.arrays["codes_val"][:, r] = rng.exponential(1.0, (1, m, S, K)).astype(np.float32)
        lake.arrays["entropy"][r] = rng.uniform(0, 5, m)
        lake.arrays["question_text"][r] = np.array([f"question {i}" for i in range(r.start, r.stop)])
        lake.arrays["completion"][r] = np.full((m, S), "a completion")
        lake.arrays["done"][r] = True
    return url
