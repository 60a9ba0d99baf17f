"""Feature rivalry: entropy groups, sparse feature correlations, Mann-Whitney U.

Definitions (the protocol of ``shared/reference/qwen35-35b-a3b-experiment-card.txt``):

* Groups: questions split by first-token entropy (exact logit entropy by default, or the
  empirical entropy of the sampled first tokens) into *ambiguous* (high) and *unambiguous*
  (low): ``median`` (ambiguous = e > median, unambiguous = e <= median), ``quantile``
  (ambiguous = e >= q_{1-q}, unambiguous = e <= q_q, the middle left out) or ``threshold``
  (ambiguous = e > t).
* Per-question score (default; questions are the independent units): take the question's S
  samples' TopK codes at the completion's last token; the features active (value > 0) in any
  sample form an S x m matrix (0 where inactive); features constant across the S samples
  have no defined correlation and are left out and counted; the score is the 5th percentile
  (numpy 'linear') of the Pearson correlations of all pairs of the remaining features.
  Questions with fewer than 2 usable features or fewer than 2 samples score NaN.
* Across questions (the card's literal reading): within a group, the prompt-end codes of the
  group's questions form a sparse Q x F matrix over the features active in at least
  ``min_questions`` of them; the Pearson correlations of all feature pairs across questions
  and their 5th percentile per group, with a bootstrap over questions: its bias estimate,
  the bias-corrected p5 and the basic 95% interval for the population p5 (see
  ``across_questions`` for why the raw sample p5 can fall outside it).

Everything works on the sparse codes. A per-question score costs O(S * u^2) where u is the
number of distinct standardized feature vectors: a feature active in exactly one sample has
the same standardized vector as every other feature active only in that sample, whatever
its value, so those collapse into at most S patterns carried with multiplicities, and the
percentile is taken on the weighted distribution exactly as on the expanded one.
Imports numpy/scipy/xarray only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import scipy.stats

Rule = Literal["median", "quantile", "threshold"]
AMBIGUOUS, UNAMBIGUOUS, EXCLUDED = "ambiguous", "unambiguous", ""


# ------------------------------------------------------------------------ groups
@dataclass
class Grouping:
    labels: np.ndarray  # str per question: ambiguous / unambiguous / "" (left out)
    rule: str
    cutoffs: dict[str, float]

    def summary(self, entropy: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, **self.cutoffs}
        for g in (AMBIGUOUS, UNAMBIGUOUS):
            e = entropy[self.labels == g]
            out[g] = {"n": int(e.size), "entropy_min": float(e.min()) if e.size else None,
                      "entropy_max": float(e.max()) if e.size else None}
        out["left_out"] = int((self.labels == EXCLUDED).sum())
        return out


def entropy_groups(entropy: np.ndarray, rule: Rule = "median", q: float = 0.25, threshold: float | None = None) -> Grouping:
    """Label questions ambiguous / unambiguous by their entropy (NaN entropy: left out)."""
    e = np.asarray(entropy, dtype=float)
    ok = np.isfinite(e)
    labels = np.full(e.shape, EXCLUDED, dtype=object)
    if not ok.any():
        return Grouping(labels.astype(str), rule, {})
    if rule == "median":
        cut = float(np.median(e[ok]))
        labels[ok & (e > cut)] = AMBIGUOUS
        labels[ok & (e <= cut)] = UNAMBIGUOUS
        cutoffs = {"median": cut}
    elif rule == "quantile":
        if not 0 < q <= 0.5:
            raise ValueError(f"quantile rule needs 0 < q <= 0.5, got {q}")
        lo, hi = (float(x) for x in np.quantile(e[ok], [q, 1 - q]))
        labels[ok & (e >= hi)] = AMBIGUOUS
        labels[ok & (e <= lo)] = UNAMBIGUOUS
        if lo == hi:  # a degenerate distribution: never put a question in both groups
            labels[ok & (e == lo)] = EXCLUDED
        cutoffs = {"q": q, "low": lo, "high": hi}
    elif rule == "threshold":
        if threshold is None:
            raise ValueError("the threshold rule needs threshold=")
        labels[ok & (e > threshold)] = AMBIGUOUS
        labels[ok & (e <= threshold)] = UNAMBIGUOUS
        cutoffs = {"threshold": float(threshold)}
    else:
        raise ValueError(f"unknown grouping rule {rule!r} (median, quantile, threshold)")
    return Grouping(labels.astype(str), rule, cutoffs)


# ----------------------------------------------------------- per-question scores
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
    """Rivalry score of one question from its (S, k) codes; see the module docstring."""
    S = idx.shape[0]
    active = val > 0
    feats, inverse = np.unique(idx[active], return_inverse=True)
    m = feats.size
    if S < 2 or m == 0:
        return QuestionScore(np.nan, m, 0, 0)
    rows = np.nonzero(active)[0]
    X = np.zeros((S, m))
    X[rows, inverse] = val[active]
    sd = X.std(axis=0)
    usable = sd > 0
    n_const = int((~usable).sum())
    X, sd = X[:, usable], sd[usable]
    support = (X != 0).sum(axis=0)
    single = support == 1
    # Features active in exactly one sample: one standardized vector per sample.
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


def dense_question_score(idx: np.ndarray, val: np.ndarray, d_sae: int, pct: float = 5.0) -> float:
    """The naive reference: densify to (S, d_sae), np.corrcoef over non-constant active
    features, percentile of the upper triangle. For tests and the benchmark baseline."""
    S = idx.shape[0]
    dense = np.zeros((S, d_sae))
    np.put_along_axis(dense, idx.astype(np.int64), val, axis=1)
    active = (dense > 0).any(0)
    cols = dense[:, active]
    cols = cols[:, cols.std(0) > 0]
    if S < 2 or cols.shape[1] < 2:
        return float("nan")
    C = np.corrcoef(cols, rowvar=False)
    return float(np.percentile(C[np.triu_indices_from(C, k=1)], pct))


def score_questions(codes_idx: np.ndarray, codes_val: np.ndarray, pct: float = 5.0) -> dict[str, np.ndarray]:
    """Per-question scores for a block of (Q, S, k) codes."""
    out = [question_score(codes_idx[i], codes_val[i], pct) for i in range(codes_idx.shape[0])]
    return {
        "score": np.array([o.score for o in out]),
        "n_features": np.array([o.n_features for o in out], dtype=np.int32),
        "n_constant": np.array([o.n_constant for o in out], dtype=np.int32),
        "n_pairs": np.array([o.n_pairs for o in out], dtype=np.int64),
    }


# ------------------------------------------------------------ across questions
def sparse_codes_matrix(idx: np.ndarray, val: np.ndarray, min_questions: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(Q x F CSR of activations, feature ids) over features active in >= min_questions rows."""
    Q, k = idx.shape
    rows = np.repeat(np.arange(Q), k)
    mat = sp.csr_matrix((val.ravel().astype(np.float64), (rows, idx.ravel().astype(np.int64))))
    mat.eliminate_zeros()
    nnz = np.diff(mat.tocsc().indptr)
    keep = np.flatnonzero(nnz >= min_questions)
    return mat[:, keep].tocsr(), keep


def pairwise_correlations(X: sp.csr_matrix) -> np.ndarray:
    """Upper-triangle Pearson correlations between the columns of a sparse Q x F matrix."""
    Q, F = X.shape
    if Q < 2 or F < 2:
        return np.empty(0)
    mu = np.asarray(X.mean(axis=0)).ravel()
    ex2 = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    var = ex2 - mu**2
    good = var > 1e-15 * np.maximum(ex2, 1e-300)
    X, mu, var = X[:, good], mu[good], var[good]
    if X.shape[1] < 2:
        return np.empty(0)
    cov = (X.T @ X).toarray() / Q - np.outer(mu, mu)
    C = np.clip(cov / np.sqrt(np.outer(var, var)), -1, 1)
    return C[np.triu_indices_from(C, k=1)]


@dataclass
class AcrossResult:
    n_questions: int
    n_features: int
    n_pairs: int
    p5: float
    ci: tuple[float, float]
    correlations: np.ndarray = field(repr=False)
    bootstrap_bias: float = float("nan")  # mean bootstrap p5 minus the sample p5

    @property
    def p5_bias_corrected(self) -> float:
        return self.p5 - self.bootstrap_bias


def across_questions(idx: np.ndarray, val: np.ndarray, min_questions: int = 5, pct: float = 5.0,
                     n_boot: int = 200, seed: int = 0) -> AcrossResult:
    """The card's reading for one group: correlations across its questions, bootstrap CI."""
    X, feats = sparse_codes_matrix(idx, val, min_questions)
    corr = pairwise_correlations(X)
    p5 = float(np.percentile(corr, pct)) if corr.size else float("nan")
    # Bootstrap over questions. The sample p5 of pairwise correlations is biased outward: with
    # finitely many questions the correlations are noisy and their distribution wider than the
    # population's. The bootstrap estimates that bias (mean of resampled p5 minus p5), and the
    # basic (reverse-percentile) interval [2 p5 - q97.5, 2 p5 - q2.5] is the 95% interval for
    # the population p5; it brackets the bias-corrected p5 (p5 - bias), and may exclude the
    # raw sample p5 when the bias is larger than the spread.
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if corr.size else 0):
        c = pairwise_correlations(X[rng.integers(0, idx.shape[0], idx.shape[0])])
        if c.size:
            boots.append(np.percentile(c, pct))
    if boots:
        lo, hi = np.percentile(boots, [2.5, 97.5])
        ci = (float(2 * p5 - hi), float(2 * p5 - lo))
        bias = float(np.mean(boots) - p5)
    else:
        ci, bias = (float("nan"), float("nan")), float("nan")
    return AcrossResult(idx.shape[0], int(feats.size), int(corr.size), p5, ci, corr, bias)


# ------------------------------------------------------------------------- tests
def compare_groups(amb: np.ndarray, unamb: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mann-Whitney U (two-sided, and one-sided: ambiguous lower), rank-biserial effect size
    r = 2 U_amb / (n_amb n_unamb) - 1 (negative: ambiguous scores lower), and a percentile
    bootstrap CI of median(amb) - median(unamb)."""
    a = np.asarray(amb, float)
    b = np.asarray(unamb, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out: dict[str, Any] = {"n_ambiguous": int(a.size), "n_unambiguous": int(b.size)}
    for name, x in (("ambiguous", a), ("unambiguous", b)):
        out[f"median_{name}"] = float(np.median(x)) if x.size else None
        out[f"p5_{name}"] = float(np.percentile(x, 5)) if x.size else None
    if a.size == 0 or b.size == 0:
        out.update(reason="an empty group: no test", U=None, p_two_sided=None, p_less=None, rank_biserial=None,
                   median_diff=None, median_diff_ci=None)
        return out
    two = scipy.stats.mannwhitneyu(a, b, alternative="two-sided")
    less = scipy.stats.mannwhitneyu(a, b, alternative="less")
    out.update(U=float(two.statistic), p_two_sided=float(two.pvalue), p_less=float(less.pvalue),
               rank_biserial=float(2 * two.statistic / (a.size * b.size) - 1),
               median_diff=float(np.median(a) - np.median(b)))
    if a.size > 1 and b.size > 1:
        boot = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: np.median(x, axis=axis) - np.median(y, axis=axis),
                                     n_resamples=n_boot, method="percentile", vectorized=True,
                                     random_state=np.random.default_rng(seed))
        out["median_diff_ci"] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    else:
        out["median_diff_ci"] = None
    return out
