"""The paper's across-question protocol and the calibrated test of excess rivalry.

The paper's statistics (per group: features with mean activation > 0.01, at most 300 chosen by
``RandomState(42)``, p5 of their pairwise Pearson correlations across the group's questions;
``mannwhitneyu(pairs_amb, pairs_unamb, "less")``) are reproduced as published and reported as
descriptive: feature pairs share features and questions, and p5 moves with firing frequency.

The calibrated test (``rivalry_test``) compares the groups' *excess* structure:
``excess = p5 - null p5``, the null being the feature-marginal one (each selected feature's
values moved to random questions of the group: firing frequencies kept, co-activation broken).
Its design, chosen by measuring level and power (README, "The rivalry study"):

* **Equal group sizes.** The excess of a group with real structure depends on how many
  questions it has, so groups of different sizes are never compared directly. With n
  questions in the smaller group, the larger group is cut at random into floor(N/n) disjoint
  blocks of n questions; ``T = excess(small) - mean over blocks of excess(block)`` (signed so
  that T < 0 means the ambiguous group has more rival structure), every excess taken at n
  questions. Every question of the smaller group and n * floor(N/n) of the larger are used.
* **Label permutations of the whole pool** (groups' sizes kept) recompute the same statistic
  (a new block partition, new null draws) on each relabelling: exact when the labels are
  exchangeable, and centred on the observed T's null whatever the sizes, since both relabelled
  groups are then compared at the same size (a pooled comparison at 448/64 was not: the
  excess of a mixture depends on its size). Within ``strata`` (e.g. PopQA's relation types) the
  labels are permuted within each stratum and T is the size-weighted mean of the strata's Ts.
* **Stable p-values.** T is random (block partition, null draws): one evaluation is
  theta + e, with e the Monte-Carlo noise. The observed T is the mean of ``replicates`` draws
  (noise e_bar); each permutation is one draw; ``noise_pairs`` permutations are drawn twice
  (same labels, new blocks and null draws), which measures Var(e). The reference for the
  observed mean is then normal with the permutations' mean and variance
  Var(T_perm) - Var(e) + Var(e) / replicates (the noise the permutations carry and the mean
  does not is taken out), and ``p_less`` is its lower tail at the observed mean. Its
  Monte-Carlo standard error (``p_less_mc_se``) comes from resampling every random input
  (permutations, noise pairs, replicates). The plain randomised permutation p-value of one
  draw is reported beside it (``p_perm_single_draw``). Every random stream is keyed by
  (seed, role, index): permutation i uses the same stream whatever ``n_perm`` is.
* **No claim from tiny groups**: below ``min_group`` questions in either group no calibrated
  p-value is computed, and the result says why.

Imports numpy/scipy only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.stats

from .correlations import (
    DENSE_FEATURES,
    blocked_pair_percentile,
    constant_columns,
    pair_correlations,
    percentile,
    permute_columns,
    select_features,
)

# Keys of the random streams: np.random.default_rng([seed, ROLE, index]).
_PERMUTATION, _OBSERVED, _DESCRIPTIVE, _BOOTSTRAP = 0, 1, 2, 3


@dataclass
class GroupStats:
    """One group's across-question correlation structure (descriptive: the paper's numbers)."""

    n_questions: int
    n_active: int  # passed the mean-activation filter
    n_features: int  # used (after the cap)
    n_constant: int  # left out: constant across the group's questions
    n_pairs: int
    p5: float
    null_p5: float  # mean over the feature-marginal null draws
    null_p5_draws: list[float]
    n_single: int = 0  # used features active in a single question of the group
    correlations: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    null_correlations: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    @property
    def excess(self) -> float:
        return self.p5 - self.null_p5

    def as_dict(self, pct: float) -> dict[str, Any]:
        tag = f"p{pct:g}"
        return {"n_questions": self.n_questions, "n_active": self.n_active, "n_features": self.n_features,
                "n_constant": self.n_constant, "n_pairs": self.n_pairs, "n_single_activation": self.n_single,
                tag: self.p5, f"null_{tag}": self.null_p5, f"null_{tag}_draws": self.null_p5_draws}


@dataclass(frozen=True)
class PaperParams:
    """The knobs of the across-question protocol (defaults: the paper's) and of the calibrated
    test: ``n_null`` feature-marginal draws per excess, ``replicates`` draws of the observed
    statistic, ``min_group`` questions each group needs for a calibrated p-value,
    ``min_stratum`` questions each group needs in a stratum for the stratum to count, and
    ``report_draws`` null draws for the descriptive per-group null p5."""

    pct: float = 5.0
    min_mean: float = 0.01
    max_features: int | None = 300
    feature_seed: int = 42
    min_questions: int = 1
    n_null: int = 1
    report_draws: int = 10
    replicates: int = 32
    noise_pairs: int = 200
    min_group: int = 20
    min_stratum: int = 10


def group_stats(X: sp.csr_matrix, params: PaperParams, rng: np.random.Generator, keep: bool = True,
                n_null: int | None = None) -> GroupStats:
    """p5 of one group's feature correlations and its feature-marginal null (mean of draws)."""
    feats, n_active = select_features(X, params.min_mean, params.max_features, params.feature_seed,
                                      params.min_questions)
    Xs = sp.csc_matrix(X[:, feats]) if feats.size else sp.csc_matrix((X.shape[0], 0))
    n_single = int((np.diff(Xs.indptr) == 1).sum()) if feats.size else 0
    draws = params.n_null if n_null is None else n_null
    if feats.size > DENSE_FEATURES:  # no cap: never F x F; the exact percentile in blocks
        p5, n_pairs, n_const = blocked_pair_percentile(Xs, params.pct)
        nulls = [blocked_pair_percentile(permute_columns(Xs, rng), params.pct)[0] for _ in range(draws if n_pairs else 0)]
        corr = null_corr = np.empty(0)
    else:
        corr, n_const = pair_correlations(Xs) if not keep else _corrcoef_pairs(Xs)
        p5, n_pairs = percentile(corr, params.pct), int(corr.size)
        nulls, null_corr = [], np.empty(0)
        for _ in range(draws if corr.size else 0):
            null_corr, _ = pair_correlations(permute_columns(Xs, rng))
            nulls.append(percentile(null_corr, params.pct))
    null_p5 = float(np.mean(nulls)) if nulls else float("nan")
    return GroupStats(X.shape[0], n_active, int(feats.size), n_const, n_pairs, p5, null_p5, nulls, n_single,
                      corr if keep else np.empty(0), null_corr if keep else np.empty(0))


def _corrcoef_pairs(Xs: sp.csc_matrix) -> tuple[np.ndarray, int]:
    """The reported (whole-group) correlations exactly as the paper's code makes them:
    ``np.corrcoef`` of the dense non-constant columns, so its ties (features firing in one
    question: -1/(Q-1)) are ties here too and the MWU's U is the paper's."""
    good = ~constant_columns(Xs)
    if Xs.shape[0] < 2 or good.sum() < 2:
        return np.empty(0), int((~good).sum())
    C = np.corrcoef(Xs[:, np.flatnonzero(good)].toarray().T)
    return C[np.triu_indices_from(C, k=1)], int((~good).sum())


def paper_mwu(amb: np.ndarray, unamb: np.ndarray) -> dict[str, Any]:
    """The paper's test over all pairs: ``mannwhitneyu(amb, unamb, alternative="less")`` on the
    correlations ``np.corrcoef`` gives (``_corrcoef_pairs``): its ties are the paper's."""
    if amb.size == 0 or unamb.size == 0:
        return {"U": None, "p_less": None, "rank_biserial": None,
                "reason": "an empty group, or more than DENSE_FEATURES features (pairs not held): no test"}
    a, u = amb, unamb
    res = scipy.stats.mannwhitneyu(a, u, alternative="less")
    return {"U": float(res.statistic), "p_less": float(res.pvalue),
            "rank_biserial": float(2 * res.statistic / (a.size * u.size) - 1)}


# ------------------------------------------------------------- the calibrated test
@dataclass
class Balanced:
    """One draw of the equal-size statistic (summed over strata with weights)."""

    statistic: float  # excess_ambiguous - excess_unambiguous (< 0: ambiguous more rival)
    excess: dict[str, float]  # per group, at the block size
    p5: dict[str, float]
    null_p5: dict[str, float]
    per_stratum: list[float]


def _balanced_one(X: sp.csr_matrix, rows: np.ndarray, is_amb: np.ndarray, params: PaperParams,
                  rng: np.random.Generator) -> tuple[float, dict[str, tuple[float, float]]]:
    """T on one stratum's rows: the smaller group against disjoint random blocks of the
    larger one, every excess at the smaller group's size."""
    a, u = rows[is_amb[rows]], rows[~is_amb[rows]]
    amb_small = a.size <= u.size
    small, large = (a, u) if amb_small else (u, a)
    n = small.size
    n_blocks = large.size // n
    blocks = rng.permutation(large)[: n_blocks * n].reshape(n_blocks, n)
    s = group_stats(X[small], params, rng, keep=False)
    bl = [group_stats(X[np.sort(b)], params, rng, keep=False) for b in blocks]
    small_v = (s.p5, s.null_p5)
    large_v = (float(np.mean([b.p5 for b in bl])), float(np.mean([b.null_p5 for b in bl])))
    parts = {"ambiguous": small_v if amb_small else large_v, "unambiguous": large_v if amb_small else small_v}
    ex = {g: v[0] - v[1] for g, v in parts.items()}
    return ex["ambiguous"] - ex["unambiguous"], parts


def balanced_statistic(X: sp.csr_matrix, is_amb: np.ndarray, strata: list[np.ndarray], weights: np.ndarray,
                       params: PaperParams, rng: np.random.Generator) -> Balanced:
    """The calibrated test's statistic for one labelling: per stratum (rows given), T at equal
    group sizes; combined as the weighted mean (weights: each stratum's block size)."""
    Ts, parts = [], []
    for rows in strata:
        t, p = _balanced_one(X, rows, is_amb, params, rng)
        Ts.append(t)
        parts.append(p)
    w = weights / weights.sum()
    p5 = {g: float(sum(wi * p[g][0] for wi, p in zip(w, parts))) for g in ("ambiguous", "unambiguous")}
    null = {g: float(sum(wi * p[g][1] for wi, p in zip(w, parts))) for g in ("ambiguous", "unambiguous")}
    return Balanced(float(np.dot(w, Ts)), {g: p5[g] - null[g] for g in p5}, p5, null, [float(t) for t in Ts])


@dataclass
class Calibrated:
    """The calibrated label-permutation test of T = excess_ambiguous - excess_unambiguous."""

    design: str
    p_less: float | None = None  # one-sided: ambiguous more rival; mean over the observed replicates
    p_less_mc_se: float | None = None  # Monte-Carlo standard error of p_less
    p_two_sided: float | None = None
    statistic: float | None = None  # mean over the replicates: the tested statistic
    excess: dict[str, float] = field(default_factory=dict)
    p5: dict[str, float] = field(default_factory=dict)
    null_p5: dict[str, float] = field(default_factory=dict)
    block_size: int = 0
    n_perm: int = 0
    replicates: int = 0
    strata: list[dict[str, Any]] = field(default_factory=list)
    perm_mean: float | None = None
    perm_sd: float | None = None
    reason: str | None = None  # why there is no p-value
    noise_sd: float | None = None  # sd of one evaluation's Monte-Carlo noise (blocks, null draws)
    p_perm_single: float | None = None  # the plain permutation p of one observed draw (randomised)
    perm_statistics: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    def as_dict(self) -> dict[str, Any]:
        out = {"design": self.design, "p_less": self.p_less, "p_less_mc_se": self.p_less_mc_se,
               "p_two_sided": self.p_two_sided, "statistic": self.statistic, "n_perm": self.n_perm,
               "replicates": self.replicates, "block_size": self.block_size,
               "perm_statistics": {"mean": self.perm_mean, "sd": self.perm_sd}, "noise_sd": self.noise_sd,
               "p_perm_single_draw": self.p_perm_single, "strata": self.strata,
               "what": "label permutation of T = excess_ambiguous - excess_unambiguous at equal group sizes "
                       "(excess = p5 - feature-marginal null p5): calibrated"}
        for g, v in self.excess.items():
            out[f"excess_{g}"] = v
            out[f"p5_{g}"] = self.p5.get(g)
            out[f"null_p5_{g}"] = self.null_p5.get(g)
        if self.reason:
            out["reason"] = self.reason
        return out


def _strata_rows(is_amb: np.ndarray, strata: np.ndarray | None, params: PaperParams
                 ) -> tuple[list[np.ndarray], np.ndarray, list[dict[str, Any]]]:
    """Row sets of the strata that hold both groups with >= min_stratum questions each (all
    rows as one stratum when ``strata`` is None), their weights, and every stratum's make-up."""
    if strata is None:
        strata = np.zeros(is_amb.size, np.int64)
    keys, inv = np.unique(np.asarray(strata), return_inverse=True)
    used, weights, table = [], [], []
    for i, key in enumerate(keys):
        rows = np.flatnonzero(inv == i)
        na, nu = int(is_amb[rows].sum()), int((~is_amb[rows]).sum())
        ok = min(na, nu) >= (params.min_stratum if len(keys) > 1 else params.min_group)
        table.append({"stratum": key.item() if hasattr(key, "item") else key, "n_ambiguous": na, "n_unambiguous": nu,
                      "used": bool(ok), "block_size": min(na, nu) if ok else 0})
        if ok:
            used.append(rows)
            weights.append(min(na, nu))
    return used, np.asarray(weights, float), table


def candidate_columns(X: sp.csr_matrix, n: int, min_mean: float) -> np.ndarray:
    """Columns that can pass the mean filter in some group of n rows: their positive values
    must sum above min_mean * n (positive parts: raw Qwen-Scope TopK codes keep negative
    values, and a pooled sum would drop a feature whose other rows are negative)."""
    pos = X.maximum(0) if X.nnz and X.data.min() < 0 else X
    col_sum = np.asarray(pos.sum(axis=0)).ravel()
    return np.flatnonzero(col_sum > max(min_mean, 0.0) * n)


def calibrated_test(X: sp.csr_matrix, is_ambiguous: np.ndarray, params: PaperParams = PaperParams(),
                    n_perm: int = 1000, seed: int = 0, n_jobs: int | None = None,
                    strata: np.ndarray | None = None) -> Calibrated:
    """The calibrated test on pooled rows (see the module docstring). ``strata``: one label
    per row (e.g. the relation type); labels are then permuted within strata."""
    is_amb = np.asarray(is_ambiguous, bool)
    X = sp.csr_matrix(X)
    design = ("equal-size blocks, labels permuted " + ("within strata" if strata is not None else "over all questions"))
    na, nu = int(is_amb.sum()), int((~is_amb).sum())
    if n_perm == 0:
        return Calibrated(design, reason="n_perm = 0: the calibrated test was not run")
    if min(na, nu) < params.min_group:
        return Calibrated(design, reason=f"the {'ambiguous' if na < nu else 'unambiguous'} group has {min(na, nu)} "
                                         f"questions (< min_group = {params.min_group}): no calibrated p-value")
    rows, weights, table = _strata_rows(is_amb, strata, params)
    if not rows:
        return Calibrated(design, strata=table, reason=f"no stratum holds >= {params.min_stratum} questions of "
                                                       "each group: no calibrated p-value")
    # Columns that can pass the mean filter in some evaluated group: every group evaluated has
    # the block size n of its stratum, so a column's positive values must sum above min_mean * n
    # (positive parts: raw Qwen-Scope TopK codes keep negative values). Ids stay in order, so
    # the cap's choice is the one made on the full matrix.
    n_min = int(weights.min())
    Xc = X[:, candidate_columns(X, n_min, params.min_mean)].tocsr()

    reps = [balanced_statistic(Xc, is_amb, rows, weights, params, np.random.default_rng([seed, _OBSERVED, r]))
            for r in range(max(2, params.replicates))]

    def one(i: int, draw: int = 0) -> float:
        r = np.random.default_rng([seed, _PERMUTATION, i])  # the relabelling: the same for both draws
        lab = is_amb.copy()
        for rs in rows:
            lab[rs] = r.permutation(lab[rs])
        aux = r if draw == 0 else np.random.default_rng([seed, _PERMUTATION, i, draw])
        return balanced_statistic(Xc, lab, rows, weights, params, aux).statistic

    n_twice = min(n_perm, params.noise_pairs)
    tasks = [(i, 0) for i in range(n_perm)] + [(i, 1) for i in range(n_twice)]
    jobs = n_jobs or min(4, os.cpu_count() or 1)
    if jobs > 1 and len(tasks) > 1:
        with ThreadPoolExecutor(jobs) as ex:
            values = np.fromiter(ex.map(lambda t: one(*t), tasks), float, len(tasks))
    else:
        values = np.fromiter((one(*t) for t in tasks), float, len(tasks))
    perms, second = values[:n_perm], values[n_perm:]
    T_r = np.array([b.statistic for b in reps])
    for t, stratum in zip(np.mean([b.per_stratum for b in reps], axis=0), [s for s in table if s["used"]]):
        stratum["statistic"] = float(t)
    out = Calibrated(design, statistic=float(np.mean(T_r)), block_size=n_min if strata is None else int(weights.sum()),
                     n_perm=int(np.isfinite(perms).sum()), replicates=len(reps),
                     strata=table if strata is not None else [], perm_statistics=perms)
    out.excess = {g: float(np.mean([b.excess[g] for b in reps])) for g in ("ambiguous", "unambiguous")}
    out.p5 = {g: float(np.mean([b.p5[g] for b in reps])) for g in ("ambiguous", "unambiguous")}
    out.null_p5 = {g: float(np.mean([b.null_p5[g] for b in reps])) for g in ("ambiguous", "unambiguous")}
    ok = np.isfinite(perms)
    pairs = np.isfinite(perms[:n_twice]) & np.isfinite(second)
    if ok.sum() < 20 or pairs.sum() < 2 or not np.isfinite(T_r).all():
        out.reason = ("the statistic is undefined or too few permutations ran (>= 20 and >= 2 noise pairs needed): "
                      "no calibrated p-value")
        return out
    out.perm_mean, out.perm_sd = float(perms[ok].mean()), float(perms[ok].std())
    p, p_greater = _deconvolved_p(T_r, perms[ok], perms[:n_twice][pairs], second[pairs])
    out.p_less, out.p_two_sided = p, float(min(1.0, 2 * min(p, p_greater)))
    out.noise_sd = float(np.sqrt(np.mean((perms[:n_twice][pairs] - second[pairs]) ** 2) / 2))
    boot = np.random.default_rng([seed, _BOOTSTRAP])
    ps = []
    for _ in range(200):  # Monte-Carlo error: every random input of p resampled
        b_perm = boot.choice(perms[ok], ok.sum())
        j = boot.integers(0, pairs.sum(), pairs.sum())
        ps.append(_deconvolved_p(boot.choice(T_r, T_r.size), b_perm, perms[:n_twice][pairs][j], second[pairs][j])[0])
    out.p_less_mc_se = float(np.std(ps))
    out.p_perm_single = float((1 + (perms[ok] <= T_r[0]).sum()) / (1 + ok.sum()))
    return out


def _deconvolved_p(T_r: np.ndarray, perms: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """One-sided p-values (less, greater) of the mean observed statistic against the permutation
    distribution with its Monte-Carlo noise taken out: each permuted T is one draw, theta + e,
    the observed one a mean of R draws, theta + e_bar. Var(e) comes from permutations drawn twice
    (same labels, new blocks and null draws); the reference for the mean is normal with the
    permutations' mean and variance Var(T_perm) - Var(e) + Var(e) / R."""
    noise = float(np.mean((first - second) ** 2) / 2)
    var = float(np.var(perms, ddof=1))
    signal = max(var - noise, 0.05 * var)
    z = (float(np.mean(T_r)) - float(np.mean(perms))) / np.sqrt(signal + noise / T_r.size)
    return float(scipy.stats.norm.cdf(z)), float(scipy.stats.norm.sf(z))


@dataclass
class RivalryTest:
    """The paper's per-group statistics and MWU (descriptive), and the calibrated test(s)."""

    ambiguous: GroupStats
    unambiguous: GroupStats
    paper: dict[str, Any]
    calibrated: Calibrated
    pooled: Calibrated | None = None  # with strata: the same test ignoring them, beside it

    def as_dict(self, pct: float) -> dict[str, Any]:
        out = {"ambiguous": self.ambiguous.as_dict(pct), "unambiguous": self.unambiguous.as_dict(pct),
               "calibrated": self.calibrated.as_dict(),
               "paper": {**self.paper, "what": "mannwhitneyu(pairs_ambiguous, pairs_unambiguous, 'less') as in "
                                               "the paper: feature pairs are not independent draws, NOT calibrated"}}
        if self.pooled is not None:
            out["calibrated_pooled"] = self.pooled.as_dict()
        return out


def rivalry_test(X: sp.csr_matrix, is_ambiguous: np.ndarray, params: PaperParams = PaperParams(),
                 n_perm: int = 1000, seed: int = 0, n_jobs: int | None = None,
                 strata: np.ndarray | None = None) -> RivalryTest:
    """The paper's statistics on the whole groups and the calibrated test on pooled
    (ambiguous + unambiguous) rows; with ``strata``, the stratified test and the pooled one."""
    is_amb = np.asarray(is_ambiguous, bool)
    X = sp.csr_matrix(X)
    rng = np.random.default_rng([seed, _DESCRIPTIVE])
    a = group_stats(X[np.flatnonzero(is_amb)], params, rng, n_null=params.report_draws)
    u = group_stats(X[np.flatnonzero(~is_amb)], params, rng, n_null=params.report_draws)
    cal = calibrated_test(X, is_amb, params, n_perm, seed, n_jobs, strata)
    pooled = calibrated_test(X, is_amb, params, n_perm, seed, n_jobs, None) if strata is not None else None
    return RivalryTest(a, u, paper_mwu(a.correlations, u.correlations), cal, pooled)
