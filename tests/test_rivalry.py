"""Rivalry: scores against dense numpy references, tests against scipy, planted effects."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from qsae.analysis.rivalry import (
    compare_groups,
    entropy_groups,
    pairwise_correlations,
    question_score,
    sparse_codes_matrix,
    weighted_percentile,
)
from qsae.jobs.rivalry import RivalryConfig, run_rivalry
from qsae.lake.store import QuestionLake, open_lake

from .lake_fixtures import random_shard, small_spec

D_SAE = 300


def dense_reference(idx, val, pct=5.0):
    """Independent: densify to (S, d_sae), corrcoef of non-constant active columns."""
    dense = np.zeros((idx.shape[0], D_SAE))
    for s in range(idx.shape[0]):
        dense[s, idx[s]] = val[s]
    cols = dense[:, (dense > 0).any(0)]
    cols = cols[:, cols.std(0) > 0]
    if cols.shape[1] < 2 or idx.shape[0] < 2:
        return np.nan
    c = np.corrcoef(cols.T)
    return np.percentile(c[np.triu_indices_from(c, 1)], pct)


def planted_codes(rng, n_q, S, k, rival: bool):
    """Codes per question driven by one shared factor per sample (features co-vary, positive
    correlations); ``rival`` questions alternate between two features a/b instead, a pair
    with correlation -1."""
    idx = np.zeros((n_q, S, k), np.int64)
    val = np.zeros((n_q, S, k), np.float32)
    for q in range(n_q):
        shared = rng.choice(np.arange(10, D_SAE), size=k - 1, replace=False)
        a, b = rng.choice(10, 2, replace=False)
        factor = rng.exponential(1.0, S) + 0.5
        for s in range(S):
            first = (a if s % 2 == 0 else b) if rival else a
            row = np.concatenate([[first], shared])
            order = np.argsort(row)
            idx[q, s] = row[order]
            val[q, s] = (factor[s] * (1 + 0.1 * rng.standard_normal(k)))[order]
    return idx, val


def code_lake(tmp_path, idx, val, entropy, name="riv.zarr", prompt=None):
    n_q, S, k = idx.shape
    spec = small_spec(n_questions=n_q, layers=(20,), n_samples=S, d_sae=D_SAE, k=k, lineage={"sae_sha256": {"20": "x"}})
    lake = QuestionLake.open_or_create(str(tmp_path / name), spec, mode="overwrite")
    for shard in range(lake.n_shards):
        r = lake.shard_region(shard)
        data = random_shard(lake, shard)
        data["codes_idx"] = idx[None, r].astype(np.uint16)
        data["codes_val"] = val[None, r]
        data["entropy"] = entropy[r]
        if prompt is not None:
            data["prompt_codes_idx"] = prompt[0][None, r].astype(np.uint16)
            data["prompt_codes_val"] = prompt[1][None, r]
        lake.write_shard(shard, data)
    return lake.url


def test_weighted_percentile_equals_numpy_on_the_expanded_array():
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(size=rng.integers(1, 12))
        w = rng.integers(1, 5, size=v.size)
        pct = rng.uniform(0, 100)
        assert weighted_percentile(v, w, pct) == pytest.approx(np.percentile(np.repeat(v, w), pct), abs=1e-12)


def test_question_scores_equal_dense_corrcoef_reference():
    rng = np.random.default_rng(1)
    for _ in range(300):
        S, k = int(rng.integers(2, 21)), int(rng.integers(1, 8))
        pool = int(rng.integers(k, 40))  # small pools: many shared features, many single-sample ones
        idx = np.stack([np.sort(rng.choice(pool, k, replace=False)) for _ in range(S)])
        val = rng.exponential(1.0, (S, k)) * (rng.random((S, k)) < 0.9)
        if rng.random() < 0.2:
            val[:, 0], idx[:, 0] = 2.0, 0  # a feature constant across samples
        got, ref = question_score(idx, val).score, dense_reference(idx, val)
        if np.isnan(ref):
            assert np.isnan(got)
        else:
            assert got == pytest.approx(ref, abs=1e-6)


def test_constant_features_and_degenerate_questions():
    idx = np.array([[1, 2, 3]] * 5)
    val = np.ones((5, 3))
    out = question_score(idx, val)
    assert np.isnan(out.score) and out.n_constant == 3 and out.n_features == 3
    one_sample = question_score(np.array([[1, 2, 3]]), np.ones((1, 3)))
    assert np.isnan(one_sample.score) and one_sample.n_pairs == 0
    none_active = question_score(np.array([[1, 2], [3, 4]]), np.zeros((2, 2)))
    assert np.isnan(none_active.score) and none_active.n_features == 0


def test_lake_scores_and_mwu_equal_references(tmp_path):
    rng = np.random.default_rng(2)
    n_q, S, k = 40, 8, 4
    idx = np.stack([np.stack([np.sort(rng.choice(25, k, replace=False)) for _ in range(S)]) for _ in range(n_q)])
    val = rng.exponential(1.0, (n_q, S, k)).astype(np.float32)
    entropy = rng.uniform(0, 4, n_q)
    url = code_lake(tmp_path, idx, val, entropy)
    res = run_rivalry(RivalryConfig(store=url, layer=20, n_boot=200, block_questions=7))
    got = open_lake(url, group=res.group).load()
    ref = np.array([dense_reference(idx[q], val[q].astype(np.float64)) for q in range(n_q)])
    np.testing.assert_allclose(got.score.values, ref, atol=1e-6)
    amb = got.group.values == "ambiguous"
    assert amb.sum() == 20 and (entropy[amb] > np.median(entropy)).all()
    t = res.summary["test"]
    ref_mwu = scipy.stats.mannwhitneyu(ref[amb], ref[~amb], alternative="two-sided")
    assert t["U"] == pytest.approx(ref_mwu.statistic) and t["p_two_sided"] == pytest.approx(ref_mwu.pvalue)
    assert t["p_less"] == pytest.approx(scipy.stats.mannwhitneyu(ref[amb], ref[~amb], alternative="less").pvalue)
    wins = sum((x > y) + 0.5 * (x == y) for x in ref[amb] for y in ref[~amb])  # brute-force U
    assert t["rank_biserial"] == pytest.approx(2 * wins / (20 * 20) - 1)
    lo, hi = t["median_diff_ci"]
    assert lo <= t["median_diff"] <= hi
    assert res.figure and open(res.figure, "rb").read(4) == b"\x89PNG"
    assert got.attrs["lineage"]["sae_sha256"] == {"20": "x"}
    assert got.attrs["summary"]["params"]["rule"] == "median"


def test_planted_rivalry_is_detected_and_null_is_not(tmp_path):
    rng = np.random.default_rng(3)
    n_q, S, k = 48, 12, 5
    amb_idx, amb_val = planted_codes(rng, n_q // 2, S, k, rival=True)
    un_idx, un_val = planted_codes(rng, n_q // 2, S, k, rival=False)
    idx, val = np.concatenate([amb_idx, un_idx]), np.concatenate([amb_val, un_val])
    entropy = np.r_[rng.uniform(3, 5, n_q // 2), rng.uniform(0, 2, n_q // 2)]
    res = run_rivalry(RivalryConfig(store=code_lake(tmp_path, idx, val, entropy), layer=20, n_boot=200))
    t = res.summary["test"]
    assert t["p_less"] < 1e-6 and t["rank_biserial"] < -0.9 and t["median_diff_ci"][1] < 0
    # Null: the same generator in both groups; p > 0.05 in most seeds.
    nulls = []
    for seed in range(10):
        r = np.random.default_rng(100 + seed)
        idx, val = planted_codes(r, n_q, S, k, rival=bool(seed % 2))
        ent = r.uniform(0, 5, n_q)
        s = run_rivalry(RivalryConfig(store=code_lake(tmp_path, idx, val, ent, name=f"null{seed}.zarr"), layer=20, n_boot=50))
        nulls.append(s.summary["test"]["p_two_sided"])
    assert sum(p > 0.05 for p in nulls) >= 8, nulls


def test_group_rules_and_empty_groups():
    e = np.array([0.1, 0.5, 0.9, 1.2, 3.0, np.nan])
    g = entropy_groups(e, "median")
    assert list(g.labels) == ["unambiguous", "unambiguous", "unambiguous", "ambiguous", "ambiguous", ""]
    g = entropy_groups(e, "quantile", q=0.25)
    assert list(g.labels) == ["unambiguous", "unambiguous", "", "ambiguous", "ambiguous", ""]
    g = entropy_groups(e, "threshold", threshold=10.0)
    assert (g.labels == "ambiguous").sum() == 0
    out = compare_groups(np.array([]), np.array([1.0, 2.0]))
    assert out["p_two_sided"] is None and "empty group" in out["reason"]
    with pytest.raises(ValueError, match="threshold="):
        entropy_groups(e, "threshold")


def test_across_questions_mode_against_dense_corrcoef(tmp_path):
    rng = np.random.default_rng(4)
    n_q, S, k = 30, 2, 4
    pidx = np.stack([np.sort(rng.choice(12, k, replace=False)) for _ in range(n_q)])
    pval = rng.exponential(1.0, (n_q, k)).astype(np.float32)
    X, feats = sparse_codes_matrix(pidx, pval, min_questions=3)
    dense = np.zeros((n_q, 12))
    for q in range(n_q):
        dense[q, pidx[q]] = pval[q]
    keep = (dense > 0).sum(0) >= 3
    c = np.corrcoef(dense[:, keep].T)
    np.testing.assert_allclose(np.sort(pairwise_correlations(X)), np.sort(c[np.triu_indices_from(c, 1)]), atol=1e-9)
    assert list(feats) == list(np.flatnonzero(keep))
    idx = np.repeat(pidx[:, None], S, 1)
    val = np.repeat(pval[:, None], S, 1)
    url = code_lake(tmp_path, idx, val, rng.uniform(0, 3, n_q), prompt=(pidx, pval))
    res = run_rivalry(RivalryConfig(store=url, layer=20, mode="across_questions", min_questions=3, n_boot=50))
    across = res.summary["across"]
    assert set(across) == {"ambiguous", "unambiguous"}
    for g in across.values():
        assert g["n_questions"] == 15 and np.isfinite(g["p5"]) and np.isfinite(g["bootstrap_bias"])
        lo, hi = g["ci95_population"]
        assert lo <= g["p5_bias_corrected"] <= hi
        assert g["p5_bias_corrected"] == pytest.approx(g["p5"] - g["bootstrap_bias"])
    assert "not independent" in res.summary["test"]["caveat"]
