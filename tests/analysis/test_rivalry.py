"""Rivalry: the paper's protocol against an independent implementation, the calibrated test
against planted rivalry and against the confounds (firing frequency, answer diversity),
uniform p-values under the null, every layer with Holm, results and figures in the store."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from qsae.analysis.rivalry import (
    PaperParams,
    auroc,
    blocked_pair_percentile,
    calibrated_test,
    curveball,
    decoder_cosine_score,
    distinct_rows,
    entropy_groups,
    first_word_entropy,
    holm,
    pair_correlations,
    permute_columns,
    question_score,
    rivalry_test,
    score_questions,
    stratified_permutation_test,
    weighted_percentile,
)
from qsae.jobs.rivalry import RivalryConfig, run_rivalry
from qsae.lake.store import open_lake

from ..helpers import synthetic_lake

D_SAE = 300
FAST = PaperParams(report_draws=2, replicates=4)


from .lakes import (
    SPLITS,
    degenerate_lake,
    frequency_lake,
    independent_codes,
    make,
    planted_rival,
    pooled,
)


# ---------------------------------------------- the paper, independently
def paper_reference(completions, idx, val, d_sae):
    """Written from the protocol's description, with dense numpy and a Counter."""
    S = completions.shape[1]
    H = []
    for row in completions:
        words = [t.strip().split()[0].lower() if t.strip() else "" for t in row]
        p = np.array(list(Counter(words).values())) / S
        H.append(float(-(p * np.log(p)).sum() / np.log(S)))
    H = np.array(H)
    dense = np.zeros((len(idx), d_sae))
    for q in range(len(idx)):
        dense[q, idx[q]] = val[q]
    out = {}
    for name, rows in (("ambiguous", H > 0.7), ("unambiguous", H < 0.5)):
        m = dense[rows]
        active = np.where(m.mean(axis=0) > 0.01)[0]
        if len(active) > 300:
            np.random.seed(42)
            active = np.random.choice(active, 300, replace=False)
        sub = m[:, active]
        sub = sub[:, sub.std(0) > 0]
        c = np.corrcoef(sub.T)
        out[name] = c[np.triu_indices_from(c, k=1)]
    return H, out, scipy.stats.mannwhitneyu(out["ambiguous"], out["unambiguous"], alternative="less")


def test_first_word_entropy_matches_the_definition():
    c = np.array([["Paris is", " paris.", "Lyon", "", "  ", "PARIS"], ["a"] * 6])
    H = first_word_entropy(c)
    # first words: paris, paris., lyon, "", "", paris -> counts 2, 1, 1, 2 over 6
    p = np.array([2, 1, 1, 2]) / 6
    assert H[0] == pytest.approx(-(p * np.log(p)).sum() / np.log(6))
    assert H[1] == 0.0
    D, first = distinct_rows(np.array([[[1, 2], [1, 2], [3, -1]], [[5, 5], [5, 5], [5, 5]]]))
    assert D.tolist() == [2, 1] and first.tolist() == [[True, False, True], [True, False, False]]


def test_thresholds_rule_leaves_the_gap_out():
    e = np.array([0.1, 0.5, 0.6, 0.7, 0.71, np.nan])
    g = entropy_groups(e)
    assert g.labels.tolist() == ["unambiguous", "left_out", "left_out", "left_out", "ambiguous", "left_out"]
    assert g.cutoffs == {"high": 0.7, "low": 0.5, "gap": pytest.approx(0.2)}
    assert entropy_groups(e, "median").labels.tolist()[:5] == ["unambiguous"] * 3 + ["ambiguous"] * 2
    with pytest.raises(ValueError, match="low <= high"):
        entropy_groups(e, high=0.2, low=0.5)


def code_lake(tmp_path, idx, val, completions, layers=(20,), name="riv.zarr", prompt=None, entropy=None,
              completion_ids=None, relation=None):
    """A real question lake holding the given codes (per layer: the same) and completions."""
    n_q, S, k = idx.shape
    return synthetic_lake(tmp_path / name, n_q, layers, S, D_SAE, k, shard=16, codes=(idx, val), prompt=prompt,
                          completions=completions, completion_ids=completion_ids, entropy=entropy, relation=relation)


def sorted_codes(X, k):
    """Dense (Q, d) activations -> (Q, k) TopK codes sorted by index (zeros where fewer fire)."""
    top = np.argsort(-X, axis=1, kind="stable")[:, :k]
    idx = np.sort(top, axis=1)
    return idx, np.take_along_axis(X, idx, axis=1).astype(np.float32)


def test_paper_preset_equals_an_independent_implementation(tmp_path):
    rng = np.random.default_rng(7)
    n_q, S, k = 80, 6, 40
    words = np.array(["paris", "lyon", "rome", "oslo", "bern", "nice"])
    spread = rng.integers(1, 7, n_q)  # how many different first words a question's samples use
    completions = np.array([[f"{words[rng.integers(0, spread[q])]} is it {s}" for s in range(S)]
                            for q in range(n_q)], dtype=object)
    X = independent_codes(rng, n_q, D_SAE, 0.12)  # > 300 active features? no: cap tested below
    pidx, pval = sorted_codes(X, k)
    url = code_lake(tmp_path, np.repeat(pidx[:, None], S, 1), np.repeat(pval[:, None], S, 1), completions,
                    prompt=(pidx, pval))
    res = run_rivalry(RivalryConfig(store=url, n_perm=19, n_boot=0, correctness=False))
    H, ref, mwu = paper_reference(completions, pidx, pval, D_SAE)
    got = open_lake(url, group="rivalry/layer_20/paper").load()
    np.testing.assert_allclose(got.entropy.values, H, atol=1e-12)
    r = res.summary["by_layer"][20]
    for g in ("ambiguous", "unambiguous"):
        assert r[g]["n_pairs"] == ref[g].size
        assert r[g]["p5"] == pytest.approx(np.percentile(ref[g], 5), abs=1e-10)
    assert r["paper"]["U"] == pytest.approx(mwu.statistic) and r["paper"]["p_less"] == pytest.approx(mwu.pvalue)
    assert res.summary["groups"]["gap"] == pytest.approx(0.2)
    assert res.summary["params"]["protocol"] == "paper" and res.summary["params"]["paper"]["max_features"] == 300
    # the cap: more than 300 active features -> RandomState(42).choice, as the paper
    Xbig = independent_codes(rng, 60, 1200, 0.5)
    params = PaperParams(report_draws=1)
    t = rivalry_test(sp.csr_matrix(np.vstack([Xbig, Xbig[::-1]])), np.r_[np.ones(60, bool), np.zeros(60, bool)],
                     params, n_perm=0)
    active = np.where(Xbig.mean(0) > 0.01)[0]
    assert active.size > 300
    np.random.seed(42)
    chosen = np.random.choice(active, 300, replace=False)
    c = np.corrcoef(Xbig[:, chosen].T)
    assert t.ambiguous.n_features == 300 and t.ambiguous.n_active == active.size
    assert t.ambiguous.p5 == pytest.approx(np.percentile(c[np.triu_indices_from(c, 1)], 5), abs=1e-10)


def test_building_blocks_equal_references():
    rng = np.random.default_rng(1)
    X = sp.csr_matrix(independent_codes(rng, 90, 40, 0.2))
    c, n_const = pair_correlations(X)
    ref = np.corrcoef(X.toarray().T)
    np.testing.assert_allclose(np.sort(c), np.sort(ref[np.triu_indices_from(ref, 1)]), atol=1e-10)
    # the blocked exact percentile, with blocks of a few columns
    for pct in (0.5, 5.0, 50.0, 97.0):
        v, n, _ = blocked_pair_percentile(X, pct, memory_bytes=8 * 4 * 40 * 3, bins=64)
        assert n == c.size and v == pytest.approx(np.percentile(c, pct), abs=1e-12)
    # the feature-marginal null keeps every column's values and moves them to distinct rows
    P = permute_columns(X, rng)
    Xc = sp.csc_matrix(X)
    for j in range(X.shape[1]):
        a, b = Xc[:, j].toarray().ravel(), P[:, j].toarray().ravel()
        assert np.array_equal(np.sort(a), np.sort(b))
    assert not np.array_equal(P.toarray(), X.toarray())
    # Holm against its definition; AUROC against all pairs
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    assert np.allclose(holm(p)[[0, 2, 1, 4]], [0.04, 0.09, 0.09, 0.5]) and np.isnan(holm(p)[3])
    y = rng.random(50) < 0.4
    s = rng.normal(size=50) + y
    s[:5] = s[5]  # ties
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(y, s) == pytest.approx(np.mean(pairs))
    # the per-prompt score: p5 of decoder cosines among the features active above 0.01
    W = rng.normal(size=(30, 8))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    idx = np.array([[1, 4, 7, 9], [2, 3, 5, 6]])
    val = np.array([[0.5, 0.005, 2.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    got = decoder_cosine_score(idx, val, W)
    C = W[[1, 7, 9]] @ W[[1, 7, 9]].T
    assert got[0] == pytest.approx(np.percentile(C[np.triu_indices(3, 1)], 5)) and got[1] == 0.0


def test_planted_rivalry_is_detected_by_the_calibrated_test():
    """Two clusters exclusive in ambiguous questions, independent at the same firing rate in
    unambiguous ones."""
    rng = np.random.default_rng(3)
    Xa, Xu = planted_rival(rng, 160, 100, 0.08), planted_rival(rng, 160, 100, 0.08, exclusive=False)
    res = rivalry_test(*pooled(Xa, Xu), FAST, n_perm=99, seed=1).calibrated
    assert res.p_less == res.p_resolution == 0.01 and res.statistic < 0  # nothing in either reference as low
    assert res.excess["ambiguous"] < res.excess["unambiguous"]
    # and with the groups swapped there is nothing in the predicted direction
    swapped = rivalry_test(*pooled(Xu, Xa), FAST, n_perm=99, seed=1).calibrated
    assert swapped.p_less > 0.5


def test_firing_frequency_alone_is_not_rivalry():
    """Independent features firing 12% vs 2.5%: the paper's MWU calls it rivalry, the
    calibrated test does not (p > 0.05 in most seeds)."""
    ps, paper = [], []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        res = rivalry_test(*pooled(independent_codes(rng, 120, 80, 0.12), independent_codes(rng, 120, 80, 0.025)),
                           FAST, n_perm=49, seed=seed)
        ps.append(res.calibrated.p_less)
        paper.append(res.paper.p_less)
    assert max(paper) < 1e-6, paper  # the uncalibrated test is fooled
    assert sum(p > 0.05 for p in ps) >= 7, ps


def test_calibrated_p_values_are_uniform_under_the_null():
    """Exchangeable groups (one generator): KS test of 50 permutation p-values against U(0, 1)."""
    ps = []
    for seed in range(50):
        rng = np.random.default_rng(500 + seed)
        X = independent_codes(rng, 60, 30, 0.15)
        lab = np.zeros(60, bool)
        lab[rng.choice(60, 30, replace=False)] = True
        ps.append(calibrated_test(sp.csr_matrix(X), lab, FAST, n_perm=39, seed=seed).p_less)
    assert scipy.stats.kstest(np.array(ps), "uniform").pvalue > 0.01, sorted(ps)
    assert np.mean(np.array(ps) <= 0.1) <= 0.25


def diversity_confound(rng, n_q=240, S=20, d=D_SAE, k=6):
    """The issue's simulation: Dirichlet first-token distributions, same answer -> same code,
    no rivalry anywhere; entropy (first word) and D both follow the concentration."""
    conc = np.exp(rng.uniform(np.log(0.05), np.log(5.0), n_q))
    idx = np.zeros((n_q, S, k), np.int64)
    val = np.zeros((n_q, S, k), np.float32)
    ids = np.full((n_q, S, 3), -1, np.int32)
    words = []
    for q in range(n_q):
        p = rng.dirichlet(np.full(12, conc[q]))
        ans = rng.choice(12, S, p=p)
        codes = {a: (np.sort(rng.choice(d, k, replace=False)), rng.exponential(1.0, k)) for a in set(ans)}
        for s, a in enumerate(ans):
            idx[q, s], val[q, s] = codes[a]
            ids[q, s, 0] = a
        words.append([f"w{a} more" for a in ans])
    return idx, val, ids, np.array(words, dtype=object)


def test_answer_diversity_alone_is_not_rivalry():
    """Per-question scores over distinct completions, compared within D strata: null on the
    confound; the unconditional comparison of raw scores is fooled."""
    raw_ps, ps = [], []
    for seed in range(40):
        rng = np.random.default_rng(900 + seed)
        idx, val, ids, words = diversity_confound(rng, n_q=160)
        H = first_word_entropy(words)
        g = entropy_groups(H, "median")
        amb, grouped = g.labels == "ambiguous", g.labels != ""
        D, first = distinct_rows(ids)
        score = score_questions(idx, val, keep=first)["score"]
        ps.append(stratified_permutation_test(np.where(grouped, score, np.nan), amb, D, 99, seed).p_less)
        if seed < 3:
            raw = score_questions(idx, val)["score"]  # all 20 samples, duplicates included
            ok = np.isfinite(raw)  # D = 1 scores NaN and silently leaves a raw comparison
            raw_ps.append(scipy.stats.mannwhitneyu(raw[amb & ok], raw[~amb & grouped & ok]).pvalue)
    assert max(raw_ps) < 1e-6, raw_ps  # the confound is real
    # Calibrated: p-values uniform (KS; they live on the grid k/100) and the rejection rate at
    # 0.05 within binomial noise of 5% (benchmarks/bench_rivalry.py --confound measures 200 seeds).
    assert scipy.stats.kstest(np.array(ps) - 0.005, "uniform").pvalue > 0.01, sorted(ps)
    assert np.mean(np.array(ps) > 0.05) >= 0.9, ps


def test_stratified_test_detects_a_within_stratum_effect_and_is_exact():
    rng = np.random.default_rng(5)
    D = rng.integers(3, 8, 400)
    amb = rng.random(400) < 0.5
    score = -0.05 * D + rng.normal(0, 0.05, 400) - 0.03 * amb
    out = stratified_permutation_test(score, amb, D, 199, 0)
    assert out.p_less <= 0.01 and out.statistic == pytest.approx(-0.03, abs=0.015)
    null = stratified_permutation_test(score + 0.03 * amb, amb, D, 199, 0)
    assert null.p_less > 0.05
    single = stratified_permutation_test(score, D > 5, D, 19, 0)  # groups never share a stratum
    assert single.p_less is None and "no stratum" in single.reason


def test_question_scores_equal_dense_corrcoef_reference():
    rng = np.random.default_rng(1)
    for _ in range(150):
        S, k = int(rng.integers(2, 21)), int(rng.integers(1, 8))
        pool = int(rng.integers(k, 40))
        idx = np.stack([np.sort(rng.choice(pool, k, replace=False)) for _ in range(S)])
        val = rng.exponential(1.0, (S, k)) * (rng.random((S, k)) < 0.9)
        dense = np.zeros((S, pool))
        for s in range(S):
            dense[s, idx[s]] = val[s]
        cols = dense[:, (dense > 0).any(0)]
        cols = cols[:, cols.std(0) > 0]
        got = question_score(idx, val).score
        if cols.shape[1] < 2:
            assert np.isnan(got)
        else:
            c = np.corrcoef(cols.T)
            assert got == pytest.approx(np.percentile(c[np.triu_indices_from(c, 1)], 5), abs=1e-6)


def test_weighted_percentile_equals_numpy_on_the_expanded_array():
    rng = np.random.default_rng(0)
    for _ in range(100):
        v = rng.normal(size=rng.integers(1, 12))
        w = rng.integers(1, 5, size=v.size)
        pct = rng.uniform(0, 100)
        assert weighted_percentile(v, w, pct) == pytest.approx(np.percentile(np.repeat(v, w), pct), abs=1e-12)


def test_every_layer_holm_results_and_figures_in_the_store(tmp_path):
    rng = np.random.default_rng(11)
    n_q, S, k = 96, 4, 30
    words = np.array(["a", "b", "c", "d"])
    amb_q = np.arange(n_q) < n_q // 2  # half the questions: 4 different first words; half: one
    completions = np.array([[f"{words[s] if amb_q[q] else 'a'} x" for s in range(S)] for q in range(n_q)], object)
    X = np.zeros((n_q, D_SAE))  # 60 features in use: the 144 rival pairs are 8% of all pairs
    X[:, :60] = np.where(amb_q[:, None], planted_rival(rng, n_q, 60, 0.06),
                         planted_rival(rng, n_q, 60, 0.06, exclusive=False))
    pidx, pval = sorted_codes(X, k)
    url = code_lake(tmp_path, np.repeat(pidx[:, None], S, 1), np.repeat(pval[:, None], S, 1), completions,
                    layers=(4, 9), prompt=(pidx, pval))
    res = run_rivalry(RivalryConfig(store=url, n_perm=49, n_boot=0, correctness=False))
    assert res.summary["layers"] == [4, 9]
    by = open_lake(url, group="rivalry/paper").load()
    assert by.layer.values.tolist() == [4, 9]
    assert (by.p_calibrated.values <= 0.04).all()  # planted at both layers
    assert np.allclose(by.p_calibrated_holm.values, holm(by.p_calibrated.values))
    assert (by.p_calibrated_mc_se.values < 0.02).all()
    per = open_lake(url, group="rivalry/layer_9/paper").load()
    assert (per.group.values == "ambiguous").sum() == n_q // 2
    assert json.loads(json.dumps(per.attrs["summary"]["calibrated"]))["p_less_holm"] is not None
    for key in ("by_layer", "groups"):
        assert open(res.figures[key], "rb").read(4) == b"\x89PNG" and res.images[key][:4] == b"\x89PNG"
    assert "roc" not in res.figures  # correctness off: no ROC
    # per-question protocol on the same lake (completion ids distinct per sample)
    res2 = run_rivalry(RivalryConfig(store=url, protocol="per_question", layers=[9], n_perm=19, n_boot=50))
    r9 = res2.summary["by_layer"][9]
    assert res2.group == "rivalry/per_question" and "n_informative_questions" in r9["stratified_by_D"]
    assert "calibrated" not in r9 and "NOT calibrated" in r9["stratified_by_D"]["what"]  # descriptive only
    assert "p_calibrated" not in open_lake(url, group="rivalry/per_question") and "descriptive" in res2.to_text(url)


def test_constant_features_are_found_exactly_in_float64_input():
    """0.1 in every row is constant, though its float64 standard deviation is 1.4e-17, not 0."""
    X = np.array([[0.1, 1.0, 2.0], [0.1, 2.0, 1.0], [0.1, 3.0, 5.0]])
    assert np.std(X[:, 0]) > 0  # what a `sd > 0` test would have used
    c, n_const = pair_correlations(sp.csr_matrix(X))
    assert n_const == 1 and c.size == 1 and c[0] == pytest.approx(np.corrcoef(X[:, 1], X[:, 2])[0, 1])
    out = question_score(np.array([[3, 7, 9]] * 3), X)
    assert out.n_constant == 1 and out.n_pairs == 1
    assert out.score == pytest.approx(np.corrcoef(X[:, 1], X[:, 2])[0, 1])


# ------------------------- issues 23 and 33: unequal sizes, TopK's fixed count, strata, stability
# The small lakes of tests/analysis/lakes.py and a test-sized reference; the study-sized lakes and
# 30 seeds are benchmarks/bench_rivalry.py --calibration (the README's table).
FAST_TEST = PaperParams(report_draws=1, replicates=2, rounds=2)
LEVEL_SETTINGS = ["topk_pools", "topk_diversity", "topk_relations", "topk_equal_rivalry", "relu_frequency",
                  "relu_diversity"]


def level(name, na, nu, params=FAST_TEST, seeds=10, n_perm=39):
    """p-values of the calibrated test on ``seeds`` lakes of one setting (strata where it has them)."""
    out = []
    for s in range(seeds):
        X, amb, strata = make(name, np.random.default_rng(7000 + s), na, nu, small=True)
        out.append(calibrated_test(X, amb, params, n_perm=n_perm, seed=s, n_jobs=1, strata=strata))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("na,nu", SPLITS)
@pytest.mark.parametrize("name", LEVEL_SETTINGS)
def test_level_holds_without_a_rivalry_difference(name, na, nu):
    """No rivalry difference between the groups, at 64/448, 448/64 and 256/256: TopK codes from
    pools of different sizes (the fixed count of active features that fooled the feature-marginal
    null: 4 of 4 seeds below 0.05), TopK with answer diversity, TopK question types as strata,
    the same planted rivalry in both groups, ReLU-style firing-frequency and answer-diversity
    lakes. At most 2 of 10 seeds below 0.05 (P(>= 3 | 5%) = 1.2%), p-values not pushed towards
    0 (one-sided KS), never below the reference's resolution."""
    res = level(name, na, nu)
    ps = np.array([c.p_less for c in res], float)
    assert np.isfinite(ps).all(), [c.reason for c in res]
    assert (ps <= 0.05).sum() <= 2, np.sort(ps)
    assert scipy.stats.kstest(ps, "uniform", alternative="greater").pvalue > 0.01, np.sort(ps)
    assert all(c.p_less >= c.p_resolution == 1 / 40 for c in res)


@pytest.mark.slow
def test_the_level_test_catches_the_feature_marginal_null_on_topk_codes():
    """The test above fails the design it replaced: the feature-marginal null (counts per
    question not kept) reads TopK's fixed k from a small pool as rivalry; so does the relabelling
    reference alone with the fixed-fixed null (relabelled groups are mixtures, their reference too
    narrow); the groups' own fixed-fixed null holds there. (Where both groups share a rivalry the
    relabelling holds and the groups' own null need not: benchmarks/bench_rivalry.py
    --calibration, hence the larger of the two p-values.)"""
    def rejections(**kw):
        return sum(c.p_less <= 0.05 for c in level("topk_pools", 64, 448, FAST_TEST.model_copy(update=kw)))
    assert rejections(null="feature_marginal", reference="relabel") >= 4  # the level test allows 2 of 10
    assert rejections(reference="relabel") >= 3
    assert rejections(reference="conditional") <= 1


@pytest.mark.parametrize("na,nu", [(64, 448), (448, 64)])
@pytest.mark.parametrize("name", ["topk_rivalry", "relu_rivalry"])
def test_planted_rivalry_is_found_at_unequal_splits(name, na, nu):
    X, amb, _ = make(name, np.random.default_rng(na), na, nu, small=True)
    c = calibrated_test(X, amb, FAST_TEST, n_perm=39, seed=0)
    assert c.p_less == c.p_resolution == 1 / 40 and c.statistic < 0 and c.block_size == 64
    assert all(comp.p_less == 1 / 40 for comp in c.components.values())  # both references agree
    assert c.excess["ambiguous"] < c.excess["unambiguous"]


def test_a_degenerate_statistic_says_no_information(tmp_path):
    """Every feature fires in one question of its group: every p5 sits at -1/(n-1), T is
    rounding; the old formula printed "p = 0.61 ± 0.14" here."""
    X, amb = degenerate_lake(np.random.default_rng(0), 64, 128)
    c = calibrated_test(X, amb, FAST_TEST, n_perm=39, seed=0)
    assert c.degenerate and c.p_less is None and c.p_less_mc_se is None
    assert c.reason.startswith("no information") and "-1/(n-1)" in c.reason
    assert abs(c.statistic) < 1e-12
    assert rivalry_test(X, amb, FAST_TEST, n_perm=39).as_dict(5)["calibrated"]["degenerate"] is True


def test_curveball_keeps_what_topk_fixes_and_samples_uniformly():
    """Row counts, each feature's values (within each cell of rows) kept; rows labelled -1 never
    move; the chain's stationary law is uniform over the 90 binary 4 x 4 matrices with row and
    column sums 2 (chi-square over a long run)."""
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.exponential(1, (9, 12)) * (rng.random((9, 12)) < 0.4))
    cells = np.array([0, 0, 1, 1, 1, -1, 0, 1, 0])
    Y = curveball(X, rng, 5, cells)
    assert np.array_equal(np.diff(Y.indptr), np.diff(X.indptr))
    assert np.array_equal(Y[5].toarray(), X[5].toarray())
    for c in (0, 1):
        r = cells == c
        for j in range(12):
            assert np.allclose(np.sort(X[r][:, j].toarray().ravel()), np.sort(Y[r][:, j].toarray().ravel()))
    A = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], float))
    seen = Counter()
    for _ in range(18_000):
        A = curveball(A, rng, 1)
        seen[A.toarray().tobytes()] += 1
    assert len(seen) == 90
    counts = np.array(list(seen.values()))
    # successive states are dependent: a loose bound (the chain's own variance is ~2x Poisson here)
    assert scipy.stats.chisquare(counts).statistic / 89 < 4, counts


def test_p_values_are_stable_and_streams_do_not_depend_on_n_perm():
    rng = np.random.default_rng(11)
    X, amb = frequency_lake(rng, 192, 96)
    runs = [calibrated_test(X, amb, PaperParams(replicates=6), n_perm=99, seed=s) for s in range(6)]
    ps, se = np.array([c.p_less for c in runs]), np.array([c.p_less_mc_se for c in runs])
    assert (se > 0).all() and ps.std() <= 1.5 * se.mean(), (ps, se)  # moves within its stated MC error
    # draw i of each reference comes from its own stream: more draws keep the first ones
    a = calibrated_test(X, amb, FAST_TEST, n_perm=30, seed=3)
    b = calibrated_test(X, amb, FAST_TEST, n_perm=60, seed=3)
    for name in ("conditional", "relabel"):
        np.testing.assert_array_equal(a.components[name].values, b.components[name].values[:30])
        assert a.components[name].statistic == b.components[name].statistic  # nor the observed statistic


def two_relation_lake(rng):
    """Relation A questions use features 0-11, relation B features 12-23 (exclusive across
    relations, no rivalry within one); the ambiguous group mixes them 50/50, the unambiguous
    group 5/1."""
    def rel(n, feats):
        X = independent_codes(rng, n, 60, 0.04)
        X[:, feats] = independent_codes(rng, n, 12, 0.5)
        return X
    A, B = list(range(0, 12)), list(range(12, 24))
    Xa = np.vstack([rel(120, A), rel(120, B)])
    Xu = np.vstack([rel(200, A), rel(40, B)])
    strata = np.array(["A"] * 120 + ["B"] * 120 + ["A"] * 200 + ["B"] * 40, dtype=object)
    return Xa, Xu, strata


def test_question_types_are_strata_not_rivalry(tmp_path):
    rng = np.random.default_rng(22)
    Xa, Xu, strata = two_relation_lake(rng)
    X, amb = pooled(Xa, Xu)
    res = rivalry_test(X, amb, FAST_TEST, n_perm=49, seed=0, strata=strata)
    assert res.pooled.p_less < 0.05  # mixing relations looks like rivalry when pooled
    assert res.calibrated.p_less > 0.05, res.calibrated.as_dict()  # within relations it is not
    assert [(s["stratum"], s["n_ambiguous"], s["n_unambiguous"], s["used"]) for s in res.calibrated.strata] == [
        ("A", 120, 200, True), ("B", 120, 40, True)]
    # the same through a lake: `relation` stored per question, strata chosen by default
    k = 30
    pidx, pval = sorted_codes(X.toarray(), k)
    words = np.where(amb[:, None], np.array(["a", "b", "c", "d"])[None, :], "a")
    completions = np.array([[f"{w} x" for w in row] for row in words], dtype=object)
    url = code_lake(tmp_path, np.repeat(pidx[:, None], 4, 1), np.repeat(pval[:, None], 4, 1), completions,
                    prompt=(pidx, pval), relation=strata)
    out = run_rivalry(RivalryConfig(store=url, n_perm=49, n_boot=0, correctness=False, replicates=2))
    r = out.summary["by_layer"][20]
    assert out.summary["groups"]["strata"] == "relation"
    assert out.summary["groups"]["composition"] == {"A": {"ambiguous": 120, "unambiguous": 200},
                                                    "B": {"ambiguous": 120, "unambiguous": 40}}
    assert r["calibrated"]["p_less"] > 0.05 and r["calibrated_pooled"]["p_less"] < 0.05
    assert "ignoring relation" in out.to_text(url) and "Strata (relation)" in out.to_markdown(url)
    with pytest.raises(Exception, match="no question variable 'prop'"):
        run_rivalry(RivalryConfig(store=url, n_perm=9, correctness=False, strata="prop"))


def test_tiny_groups_get_no_calibrated_p_and_say_so(tmp_path):
    rng = np.random.default_rng(2)
    n_q, S, k = 57, 4, 20
    amb_q = np.arange(n_q) >= 3  # 54 ambiguous, 3 unambiguous: the demo lake's split
    completions = np.array([[f"{'abcd'[s] if amb_q[q] else 'a'} x" for s in range(S)] for q in range(n_q)], object)
    pidx, pval = sorted_codes(independent_codes(rng, n_q, D_SAE, 0.1), k)
    url = code_lake(tmp_path, np.repeat(pidx[:, None], S, 1), np.repeat(pval[:, None], S, 1), completions,
                    prompt=(pidx, pval))
    res = run_rivalry(RivalryConfig(store=url, n_perm=19, n_boot=0, correctness=False))
    c = res.summary["by_layer"][20]["calibrated"]
    assert c["p_less"] is None and "3 questions (< min_group = 20)" in c["reason"]
    assert np.isnan(open_lake(url, group="rivalry/paper").p_calibrated.values).all()
    text = res.to_text(url)
    assert "calibrated p = n/a" in text and "caution: layer 20: the unambiguous group has 3 questions" in text
    assert "3 questions" in res.to_markdown(url)
    lower = run_rivalry(RivalryConfig(store=url, n_perm=29, n_boot=0, correctness=False, min_group=3, replicates=4))
    assert lower.summary["by_layer"][20]["calibrated"]["p_less"] is not None  # configurable


def test_qwen_scope_negative_codes_do_not_break_the_prefilter():
    """A feature that passes the mean filter in the ambiguous group while its values in the
    unambiguous group are negative (raw Qwen-Scope TopK): kept (the old filter on the pooled
    sum dropped it), so the statistic equals the one on the unfiltered matrix."""
    rng = np.random.default_rng(4)
    Xa, Xu = independent_codes(rng, 60, 40, 0.2), independent_codes(rng, 60, 40, 0.2)
    Xa[:, 5] = rng.exponential(0.5, 60)  # mean 0.5 in the ambiguous group
    Xu[:, 5] = -rng.exponential(3.0, 60)  # pooled sum negative
    X, amb = pooled(Xa, Xu)
    assert X[:, 5].sum() < 0
    from qsae.analysis.rivalry.paper import candidate_columns, layout, set_p5

    keep = candidate_columns(X, 60, 0.01)
    assert 5 in keep
    lay = layout(amb, [np.arange(120)], np.array([1.0]), np.random.default_rng(0))
    full = [set_p5(X.tocsr(), r, FAST_TEST) for r in lay.sets]
    kept = [set_p5(X[:, keep].tocsr(), r, FAST_TEST) for r in lay.sets]
    assert kept == pytest.approx(full, abs=1e-12)


def test_paper_mwu_equals_the_papers_code_on_tied_correlations():
    """Many features fire in a single question: their correlations tie at -1/(Q-1) in
    np.corrcoef, and the paper's U must be the one the paper's code gets."""
    rng = np.random.default_rng(9)
    out = []
    for n in (40, 50):
        X = independent_codes(rng, n, 60, 0.15)
        single = rng.choice(n, 25)
        X[:, 35:60] = 0
        X[single, np.arange(35, 60)] = rng.exponential(1.0, 25)  # 25 features active in one question each
        out.append(X)
    res = rivalry_test(*pooled(*out), PaperParams(report_draws=1, replicates=2), n_perm=0)
    ref = []
    for X in out:
        m = X[:, X.mean(0) > 0.01]
        c = np.corrcoef(m.T)
        ref.append(c[np.triu_indices_from(c, 1)])
    mwu = scipy.stats.mannwhitneyu(ref[0], ref[1], alternative="less")
    n_ties = np.isclose(ref[0], -1 / 39, rtol=0, atol=1e-9).sum()  # pairs of one-question features, Q = 40
    assert n_ties > 100  # the ties are there
    assert res.paper.U == mwu.statistic and res.paper.p_less == pytest.approx(mwu.pvalue, rel=1e-12)
    assert res.ambiguous.n_single >= 15  # and counted for the caution


def test_paired_auroc_uses_one_set_of_resamples():
    from qsae.analysis.rivalry import paired_auroc

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    s = rng.normal(size=200) + y
    out = paired_auroc(y, {"score": s, "same": s.copy(), "noise": rng.normal(size=200)}, n_boot=300, seed=1)
    assert out.difference["same"]["ci"] == [0.0, 0.0]  # paired: identical scores never differ
    assert out.auroc["score"] == pytest.approx(auroc(y, s))
    lo, hi = out.difference["noise"]["ci"]
    assert lo > 0 and out.ci["score"][0] < out.auroc["score"] < out.ci["score"][1]
    # the ROC figure draws every layer tested, not the best one
    from qsae.analysis.rivalry import roc_curve
    from qsae.jobs.rivalry import Correctness, PaperLayer, roc_figure

    layers = [PaperLayer(L, correctness=Correctness(n_correct=int(y.sum()), n=200, paired=out),
                         roc={k: roc_curve(y, v) for k, v in (("score", s), ("same", s), ("noise", -s))})
              for L in (3, 7)]
    fig = roc_figure(layers, RivalryConfig())
    n_pos = int(y.sum())
    assert [a.get_title() for a in fig.axes if a.axison] == [f"layer {L}: {n_pos} correct of 200" for L in (3, 7)]
