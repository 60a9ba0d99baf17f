"""Per-question scores: p5 of feature correlations over a question's distinct completions,
compared between the groups within strata of D. Imports numpy/scipy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats


def weighted_percentile(values: np.ndarray, weights: np.ndarray, pct: float) -> float:
    """numpy's 'linear' percentile of the array that repeats values[i] weights[i] times."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    n = cum[-1]
    h = (n - 1) * pct / 100.0
    lo = int(np.floor(h))
    i_lo = int(np.searchsorted(cum, lo + 1))
    i_hi = int(np.searchsorted(cum, min(lo + 2, n)))
    return float(v[i_lo] + (h - lo) * (v[i_hi] - v[i_lo]))


@dataclass
class QuestionScore:
    score: float
    n_features: int  # active in any sample
    n_constant: int  # left out: constant across samples
    n_pairs: int


def question_score(idx: np.ndarray, val: np.ndarray, pct: float = 5.0) -> QuestionScore:
    """p5 of the Pearson correlations of all pairs of features active in any of the (S, k)
    rows given, over the rows (features constant across them left out and counted).

    Pass one row per *distinct* completion (``distinct_rows``): duplicated rows carry no new
    information and only push the score towards the extremes. A feature active in exactly
    one row has the same standardized vector as every other feature active only in that row,
    so those collapse into one pattern per row, carried with multiplicities: O(S * u^2).
    """
    S = idx.shape[0]
    active = val != 0  # Qwen-Scope TopK keeps negative top-k values: active too
    feats, inverse = np.unique(idx[active], return_inverse=True)
    m = feats.size
    if S < 2 or m == 0:
        return QuestionScore(np.nan, m, 0, 0)
    rows = np.nonzero(active)[0]
    X = np.zeros((S, m))
    X[rows, inverse] = val[active]
    sd = X.std(axis=0)
    usable = ~(X == X[:1]).all(axis=0)  # exact: a variance threshold fails for float64 input
    n_const = int((~usable).sum())
    X, sd = X[:, usable], sd[usable]
    support = (X != 0).sum(axis=0)
    single = support == 1
    single_sample = np.argmax(X[:, single] != 0, axis=0)
    pattern_counts = np.bincount(single_sample, minlength=S)
    patterns = np.nonzero(pattern_counts)[0]
    Z_multi = (X[:, ~single] - X[:, ~single].mean(0)) / sd[~single]
    Z_pat = (np.eye(S)[:, patterns] - 1.0 / S) / np.sqrt((S - 1) / S**2)
    Z = np.concatenate([Z_multi, Z_pat], axis=1)
    counts = np.concatenate([np.ones(Z_multi.shape[1], dtype=np.int64), pattern_counts[patterns]])
    u = Z.shape[1]
    n_total = int(counts.sum())
    if n_total < 2:
        return QuestionScore(np.nan, m, n_const, 0)
    C = np.clip(Z.T @ Z / S, -1.0, 1.0)
    iu = np.triu_indices(u, k=1)
    if (counts == 1).all():  # nothing collapsed: a plain percentile (linear time) is exact
        return QuestionScore(float(np.percentile(C[iu], pct)), m, n_const, int(iu[0].size))
    vals = [C[iu], np.ones(1)]
    weights = [counts[iu[0]] * counts[iu[1]], np.array([int((counts * (counts - 1) // 2).sum())])]
    values, w = np.concatenate(vals), np.concatenate(weights)
    keep = w > 0
    n_pairs = int(w[keep].sum())
    return QuestionScore(weighted_percentile(values[keep], w[keep], pct), m, n_const, n_pairs)


def score_questions(codes_idx: np.ndarray, codes_val: np.ndarray, pct: float = 5.0,
                    keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-question scores for a block of (Q, S, k) codes; ``keep`` (Q, S) selects the rows
    (one per distinct completion), all rows when None."""
    out = []
    for i in range(codes_idx.shape[0]):
        rows = slice(None) if keep is None else keep[i]
        out.append(question_score(codes_idx[i][rows], codes_val[i][rows], pct))
    return {
        "score": np.array([o.score for o in out]),
        "n_features": np.array([o.n_features for o in out], dtype=np.int32),
        "n_constant": np.array([o.n_constant for o in out], dtype=np.int32),
        "n_pairs": np.array([o.n_pairs for o in out], dtype=np.int64),
    }


@dataclass
class StratifiedTest:
    """Ambiguous vs unambiguous scores compared within strata (of D): statistic and rank p-values."""

    n_informative_questions: int
    n_strata: int
    n_perm: int
    n_scored: int
    statistic: float | None = None
    p_less: float | None = None
    p_two_sided: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("n_informative_questions", "n_strata", "n_perm", "n_scored", "statistic",
                                             "p_less", "p_two_sided")}
        return {**out, "reason": self.reason} if self.reason else out


def stratified_permutation_test(score: np.ndarray, is_ambiguous: np.ndarray, strata: np.ndarray,
                                n_perm: int = 1000, seed: int = 0) -> StratifiedTest:
    """Do ambiguous questions score lower than unambiguous ones *with the same stratum* (D)?

    Statistic: the Cochran-Mantel-Haenszel-weighted mean difference
    ``sum_s w_s (mean_amb_s - mean_unamb_s) / sum_s w_s``, ``w_s = n_amb_s n_unamb_s / n_s``,
    over strata holding both groups; null: the labels permuted within each stratum. Strata
    with one group only carry no information and are counted, not used.
    """
    score = np.asarray(score, float)
    amb = np.asarray(is_ambiguous, bool)
    strata = np.asarray(strata)
    ok = np.isfinite(score)
    rng = np.random.default_rng(seed)
    obs, perm_sum, wsum, used, n_strata = 0.0, np.zeros(n_perm), 0.0, 0, 0
    for s in np.unique(strata[ok]):
        m = ok & (strata == s)
        x, a = score[m], amb[m]
        na, n = int(a.sum()), int(m.sum())
        if na == 0 or na == n:
            continue
        w = na * (n - na) / n
        total = x.sum()
        obs += w * (x[a].sum() / na - (total - x[a].sum()) / (n - na))
        keys = rng.random((n_perm, n))
        pick = np.argpartition(keys, na - 1, axis=1)[:, :na]  # na ambiguous of n, at random
        sa = x[pick].sum(axis=1)
        perm_sum += w * (sa / na - (total - sa) / (n - na))
        wsum += w
        used += n
        n_strata += 1
    out = StratifiedTest(used, n_strata, n_perm, int(ok.sum()))
    if wsum == 0:
        out.reason = "no stratum holds both groups: no test"
        return out
    T, perms = obs / wsum, perm_sum / wsum
    p_less = (1 + (perms <= T + 1e-12).sum()) / (1 + n_perm)
    p_greater = (1 + (perms >= T - 1e-12).sum()) / (1 + n_perm)
    out.statistic, out.p_less = float(T), float(p_less)
    out.p_two_sided = float(min(1.0, 2 * min(p_less, p_greater)))
    return out


@dataclass
class GroupComparison:
    """An unconditional comparison of two groups' scores (descriptive)."""

    n_ambiguous: int
    n_unambiguous: int
    medians: dict[str, float | None]
    p5: dict[str, float | None]
    U: float | None = None
    p_two_sided: float | None = None
    p_less: float | None = None
    rank_biserial: float | None = None
    median_diff: float | None = None
    median_diff_ci: list[float] | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_ambiguous": self.n_ambiguous, "n_unambiguous": self.n_unambiguous}
        for g in ("ambiguous", "unambiguous"):
            out[f"median_{g}"], out[f"p5_{g}"] = self.medians[g], self.p5[g]
        out.update(U=self.U, p_two_sided=self.p_two_sided, p_less=self.p_less, rank_biserial=self.rank_biserial,
                   median_diff=self.median_diff, median_diff_ci=self.median_diff_ci)
        return {**out, "reason": self.reason} if self.reason else out


def compare_groups(amb: np.ndarray, unamb: np.ndarray, n_boot: int = 2000, seed: int = 0) -> GroupComparison:
    """Mann-Whitney U (two-sided, and one-sided: ambiguous lower), rank-biserial effect size
    r = 2 U_amb / (n_amb n_unamb) - 1 (negative: ambiguous scores lower), and a percentile
    bootstrap CI of median(amb) - median(unamb). Not conditional on anything: descriptive."""
    a = np.asarray(amb, float)
    b = np.asarray(unamb, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    groups = {"ambiguous": a, "unambiguous": b}
    out = GroupComparison(int(a.size), int(b.size),
                          {g: float(np.median(x)) if x.size else None for g, x in groups.items()},
                          {g: float(np.percentile(x, 5)) if x.size else None for g, x in groups.items()})
    if a.size == 0 or b.size == 0:
        out.reason = "an empty group: no test"
        return out
    two = scipy.stats.mannwhitneyu(a, b, alternative="two-sided")
    less = scipy.stats.mannwhitneyu(a, b, alternative="less")
    out.U, out.p_two_sided, out.p_less = float(two.statistic), float(two.pvalue), float(less.pvalue)
    out.rank_biserial = float(2 * two.statistic / (a.size * b.size) - 1)
    out.median_diff = float(np.median(a) - np.median(b))
    if a.size > 1 and b.size > 1:
        boot = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: np.median(x, axis=axis) - np.median(y, axis=axis),
                                     n_resamples=n_boot, method="percentile", vectorized=True,
                                     random_state=np.random.default_rng(seed))
        out.median_diff_ci = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    return out
