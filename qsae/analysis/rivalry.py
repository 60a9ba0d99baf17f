"""Feature rivalry: entropy groups, feature correlations, the paper's test and calibrated ones.

The protocol (``protocol="paper"``, the default) is the one of "Feature Rivalry in SAE
Representations" (arXiv 2605.08149) and its public code, restated here so every step can be
checked against this text:

* Entropy: the first word of each of the S sampled completions
  (``text.strip().split()[0].lower()``, ``""`` for an empty completion); the Shannon entropy
  of their empirical distribution divided by log S (0: all the same, 1: all different).
* Groups: ambiguous H > 0.7, unambiguous H < 0.5, the questions between are left out.
* Activations: the SAE codes at the prompt's last token, one row per question.
* Within each group: features whose mean activation over the group's questions (zeros
  included) is > 0.01; when more than 300, 300 of them chosen by
  ``np.random.RandomState(42).choice(active, 300, replace=False)``; the Pearson correlations
  of all pairs of those features across the group's questions (features constant there have
  no correlation: they are left out and counted); their 5th percentile, p5.
* The paper's test: ``mannwhitneyu(pairs_ambiguous, pairs_unambiguous, alternative="less")``.

Why more is needed, and what qsae adds (see the issue and DESIGN.md):

* The paper's MWU treats every feature pair as an independent draw; the pairs share features
  and questions, so its p-value is not calibrated. And p5 of sparse non-negative codes moves
  with firing frequency alone: independent features that fire more often have a wider
  correlation distribution.
* Feature-marginal null: permute each selected feature's values across the group's questions
  independently (firing frequencies and value distributions kept, co-activation broken) and
  take p5 of the result: ``null_p5``, what the frequencies alone produce. ``excess = p5 -
  null_p5`` is the co-activation structure beyond that.
* The rivalry test: ``T = excess_ambiguous - excess_unambiguous``; its null distribution comes
  from shuffling the ambiguous/unambiguous labels across the pooled questions (group sizes
  kept) and recomputing everything (selection, correlations, null). One-sided p-value
  ``(1 + #{T_perm <= T}) / (1 + n_perm)``: ambiguous questions have more rival (negative)
  structure. This p-value is calibrated: under exchangeable labels it is uniform (tested).
* Per-question mode (completion-end codes, one score per question): samples with the same
  completion carry identical codes, so a question's score is computed over its D *distinct*
  completions, and the groups are compared conditional on D (a permutation test of the labels
  within D strata), since D alone moves the score and differs between the groups.

Everything works on sparse codes: a group's question x feature matrix is a scipy CSR matrix
and its Gram matrix costs O(sum over questions of active-features-squared). Imports
numpy/scipy only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import scipy.stats

# Above this many features the pair correlations are never held at once (F x F): the
# percentile is computed exactly in blocks and the paper's MWU over pairs is not run.
DENSE_FEATURES = 4096
Rule = Literal["thresholds", "median", "quantile", "threshold"]
AMBIGUOUS, UNAMBIGUOUS, EXCLUDED = "ambiguous", "unambiguous", ""


# ----------------------------------------------------------------------- entropy
def first_word(text: str) -> str:
    """The paper's answer key: the completion's first whitespace-separated word, lower-cased."""
    s = str(text).strip()
    return s.split()[0].lower() if s else ""


def first_word_entropy(completions: np.ndarray) -> np.ndarray:
    """(Q, S) completion texts -> (Q,) Shannon entropy of their first words / log S."""
    completions = np.asarray(completions)
    Q, S = completions.shape
    if S < 2 or Q == 0:
        return np.zeros(Q)
    words = np.array([first_word(t) for t in completions.ravel()], dtype=object)
    _, code = np.unique(words, return_inverse=True)
    return _row_entropy(code.reshape(Q, S)) / np.log(S)


def _row_entropy(codes: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of the empirical distribution of each row's integer codes."""
    Q, S = codes.shape
    srt = np.sort(codes, axis=1)
    new = np.ones((Q, S), bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    starts = np.flatnonzero(new.ravel())
    counts = np.diff(np.r_[starts, Q * S])
    p = counts / S
    return np.bincount(starts // S, weights=-p * np.log(p), minlength=Q)


def distinct_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, S, T) completion ids -> (D per question, (Q, S) mask of each completion's first copy).

    Rows are compared exactly: sorted lexicographically within each question."""
    Q, S = ids.shape[:2]
    flat = np.ascontiguousarray(ids.reshape(Q, S, -1))
    T = flat.shape[2]
    # lexicographic order of each question's rows (stable: the first copy comes first)
    order = np.broadcast_to(np.arange(S), (Q, S)).copy()
    for t in range(T - 1, -1, -1):
        col = np.take_along_axis(flat[:, :, t], order, axis=1)
        order = np.take_along_axis(order, np.argsort(col, axis=1, kind="stable"), axis=1)
    rows = np.take_along_axis(flat, order[:, :, None], axis=1)
    new = np.ones((Q, S), bool)
    new[:, 1:] = (rows[:, 1:] != rows[:, :-1]).any(axis=2)
    first = np.zeros((Q, S), bool)
    np.put_along_axis(first, order, new, axis=1)
    return new.sum(axis=1).astype(np.int32), first


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


def entropy_groups(entropy: np.ndarray, rule: Rule = "thresholds", q: float = 0.25, threshold: float | None = None,
                   high: float = 0.7, low: float = 0.5) -> Grouping:
    """Label questions ambiguous / unambiguous by their entropy (NaN entropy: left out).

    ``thresholds`` (the paper): ambiguous e > high, unambiguous e < low, the gap left out;
    ``median``: ambiguous e > median, unambiguous e <= median; ``quantile``: the top and bottom
    fraction q; ``threshold``: ambiguous e > threshold, the rest unambiguous.
    """
    e = np.asarray(entropy, dtype=float)
    ok = np.isfinite(e)
    labels = np.full(e.shape, EXCLUDED, dtype=object)
    if not ok.any():
        return Grouping(labels.astype(str), rule, {})
    if rule == "thresholds":
        if not low <= high:
            raise ValueError(f"the thresholds rule needs low <= high, got low={low}, high={high}")
        labels[ok & (e > high)] = AMBIGUOUS
        labels[ok & (e < low)] = UNAMBIGUOUS
        cutoffs = {"high": float(high), "low": float(low), "gap": float(high - low)}
    elif rule == "median":
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
        raise ValueError(f"unknown grouping rule {rule!r} (thresholds, median, quantile, threshold)")
    return Grouping(labels.astype(str), rule, cutoffs)


# ------------------------------------------------- across questions (the paper)
def codes_matrix(idx: np.ndarray, val: np.ndarray, d_sae: int) -> sp.csr_matrix:
    """(Q, k) TopK codes -> (Q, d_sae) CSR of activations (zeros dropped)."""
    Q, k = idx.shape
    rows = np.repeat(np.arange(Q), k)
    mat = sp.csr_matrix((val.ravel().astype(np.float64), (rows, idx.ravel().astype(np.int64))), shape=(Q, d_sae))
    mat.sum_duplicates()
    mat.eliminate_zeros()
    return mat


def select_features(X: sp.spmatrix, min_mean: float = 0.01, max_features: int | None = 300, seed: int = 42,
                    min_questions: int = 1) -> tuple[np.ndarray, int]:
    """The paper's filter: columns with mean > min_mean (and active in >= min_questions rows);
    above max_features, ``RandomState(seed).choice(active, max_features, replace=False)``.
    Returns (chosen column ids, number that passed the filter)."""
    Q = X.shape[0]
    if Q == 0:
        return np.empty(0, np.int64), 0
    mean = np.asarray(X.sum(axis=0)).ravel() / Q
    keep = mean > min_mean
    if min_questions > 1:
        keep &= np.diff(X.tocsc().indptr) >= min_questions
    active = np.flatnonzero(keep)
    n_active = int(active.size)
    if max_features is not None and active.size > max_features:
        active = np.random.RandomState(seed).choice(active, max_features, replace=False)
    return active, n_active


def constant_columns(X: sp.spmatrix) -> np.ndarray:
    """Columns whose values are all equal, decided exactly (not by a variance threshold, which
    rounding makes non-zero for float64 input): all-zero columns, and columns non-zero in
    every row with one value."""
    X = sp.csc_matrix(X)
    Q, F = X.shape
    nnz = np.diff(X.indptr)
    const = nnz == 0
    nz = np.flatnonzero(nnz > 0)
    if nz.size:  # segments of consecutive non-empty columns are exactly their own values
        lo = np.minimum.reduceat(X.data, X.indptr[nz])
        hi = np.maximum.reduceat(X.data, X.indptr[nz])
        const[nz] = (nnz[nz] == Q) & (lo == hi)
    return const


def _moments(X: sp.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Q = X.shape[0]
    X = sp.csc_matrix(X)
    X.sum_duplicates()
    X.eliminate_zeros()
    F = X.shape[1]
    nnz = np.diff(X.indptr)
    mu = np.asarray(X.sum(axis=0)).ravel() / Q
    dev = X.data - np.repeat(mu, nnz)  # centred, not E[x^2] - mu^2 (cancellation)
    var = (np.bincount(np.repeat(np.arange(F), nnz), weights=dev * dev, minlength=F) + (Q - nnz) * mu**2) / Q
    return mu, var, ~constant_columns(X)


def pair_correlations(X: sp.spmatrix) -> tuple[np.ndarray, int]:
    """Upper-triangle Pearson correlations between the columns of a sparse Q x F matrix
    (dense F x F: for the capped protocol). Returns (correlations, constant columns left out)."""
    Q = X.shape[0]
    mu, var, good = _moments(X)
    n_const = int((~good).sum())
    if Q < 2 or good.sum() < 2:
        return np.empty(0), n_const
    X = sp.csc_matrix(X)[:, np.flatnonzero(good)]
    mu, var = mu[good], var[good]
    cov = (X.T @ X).toarray() / Q - np.outer(mu, mu)
    sd = np.sqrt(var)
    C = np.clip(cov / np.outer(sd, sd), -1.0, 1.0)
    return C[np.triu_indices_from(C, k=1)], n_const


def permute_columns(X: sp.spmatrix, rng: np.random.Generator) -> sp.csc_matrix:
    """Each column's non-zero values moved to distinct rows drawn uniformly at random: the
    feature-marginal null (each feature's values and firing count kept, their co-occurrence
    with other features broken). Sparse columns draw rows with replacement and redraw
    collisions (uniform over subsets by symmetry); columns active in more than an eighth of
    the rows take the head of a full random permutation."""
    X = sp.csc_matrix(X)
    Q, F = X.shape
    nnz = np.diff(X.indptr)
    cols = np.repeat(np.arange(F, dtype=np.int64), nnz)
    rows = rng.integers(0, Q, cols.size)
    dense = np.flatnonzero(nnz * 8 > Q)
    for j in dense:
        rows[X.indptr[j]:X.indptr[j + 1]] = rng.permutation(Q)[:nnz[j]]
    sparse_cols = np.ones(F, bool)
    sparse_cols[dense] = False
    sel = np.flatnonzero(sparse_cols[cols])
    while sel.size:
        key = cols[sel] * Q + rows[sel]
        order = np.argsort(key, kind="stable")
        dup = sel[order[1:][key[order][1:] == key[order][:-1]]]
        if not dup.size:
            break
        rows[dup] = rng.integers(0, Q, dup.size)
        # Only the columns that had a collision need checking again.
        again = np.zeros(F, bool)
        again[cols[dup]] = True
        sel = sel[again[cols[sel]]]
    # Same column pointers and values, new row indices (distinct per column, not sorted).
    out = sp.csc_matrix((X.data.copy(), rows.astype(X.indices.dtype), X.indptr.copy()), shape=(Q, F))
    out.has_sorted_indices = False
    return out


def percentile(values: np.ndarray, pct: float) -> float:
    return float(np.percentile(values, pct)) if values.size else float("nan")


def blocked_pair_percentile(X: sp.spmatrix, pct: float = 5.0, memory_bytes: int = 512 << 20,
                            bins: int = 1 << 16) -> tuple[float, int, int]:
    """numpy's 'linear' percentile of all upper-triangle column correlations, exactly, in
    bounded memory: correlations are made one block of columns at a time (never F x F), a
    first pass histograms them into ``bins`` equal bins on [-1, 1], a second pass keeps only
    the values in the bins holding the two order statistics the percentile interpolates.
    Returns (percentile, pairs, constant columns left out)."""
    Q = X.shape[0]
    mu, var, good = _moments(X)
    n_const = int((~good).sum())
    X = sp.csc_matrix(X)[:, np.flatnonzero(good)]
    mu, sd = mu[good], np.sqrt(var[good])
    F = X.shape[1]
    n = F * (F - 1) // 2
    if Q < 2 or n == 0:
        return float("nan"), 0, n_const
    XT = sp.csr_matrix(X.T)
    block = max(1, int(memory_bytes // (8 * 4 * max(F, 1))))

    def blocks():
        for i0 in range(0, F - 1, block):
            i1 = min(i0 + block, F - 1)
            G = (XT[i0:i1] @ X[:, i0:]).toarray() / Q  # rows i0..i1, columns i0..F
            C = np.clip((G - np.outer(mu[i0:i1], mu[i0:])) / np.outer(sd[i0:i1], sd[i0:]), -1.0, 1.0)
            r = np.arange(i1 - i0)[:, None]
            upper = np.arange(F - i0)[None, :] > r  # strictly above the diagonal
            yield C[upper]

    def bin_of(c):
        return np.minimum(((c + 1.0) * (bins / 2.0)).astype(np.int64), bins - 1)

    counts = np.zeros(bins, np.int64)
    for c in blocks():
        counts += np.bincount(bin_of(c), minlength=bins)
    h = (n - 1) * pct / 100.0
    lo = int(np.floor(h))
    hi = min(lo + 1, n - 1)
    cum = np.cumsum(counts)
    b_lo, b_hi = int(np.searchsorted(cum, lo + 1)), int(np.searchsorted(cum, hi + 1))
    below = int(cum[b_lo - 1]) if b_lo > 0 else 0
    kept = np.concatenate([c[(b >= b_lo) & (b <= b_hi)] for c in blocks() for b in [bin_of(c)]])
    kept.sort()
    v_lo, v_hi = kept[lo - below], kept[hi - below]
    return float(v_lo + (h - lo) * (v_hi - v_lo)), n, n_const


@dataclass
class GroupStats:
    """One group's across-question correlation structure."""

    n_questions: int
    n_active: int  # passed the mean-activation filter
    n_features: int  # used (after the cap)
    n_constant: int  # left out: constant across the group's questions
    n_pairs: int
    p5: float
    null_p5: float  # mean over the feature-marginal null draws
    null_p5_draws: list[float]
    correlations: np.ndarray = field(repr=False)
    null_correlations: np.ndarray = field(repr=False)

    @property
    def excess(self) -> float:
        return self.p5 - self.null_p5

    def as_dict(self, pct: float) -> dict[str, Any]:
        tag = f"p{pct:g}"
        return {"n_questions": self.n_questions, "n_active": self.n_active, "n_features": self.n_features,
                "n_constant": self.n_constant, "n_pairs": self.n_pairs, tag: self.p5, f"null_{tag}": self.null_p5,
                f"null_{tag}_draws": self.null_p5_draws, "excess": self.excess}


@dataclass(frozen=True)
class PaperParams:
    """The knobs of the across-question protocol (defaults: the paper's), and of the null:
    ``n_null`` feature-marginal draws inside the test statistic (each evaluation, observed or
    permuted, uses its own draws: a randomised permutation test, still exact), and
    ``report_draws`` extra draws for the reported per-group null p5."""

    pct: float = 5.0
    min_mean: float = 0.01
    max_features: int | None = 300
    feature_seed: int = 42
    min_questions: int = 1
    n_null: int = 1
    report_draws: int = 10


def group_stats(X: sp.csr_matrix, params: PaperParams, rng: np.random.Generator, keep: bool = True,
                n_null: int | None = None) -> GroupStats:
    """p5 of one group's feature correlations and its feature-marginal null (mean of draws)."""
    feats, n_active = select_features(X, params.min_mean, params.max_features, params.feature_seed,
                                      params.min_questions)
    Xs = sp.csc_matrix(X[:, feats]) if feats.size else sp.csc_matrix((X.shape[0], 0))
    draws = params.n_null if n_null is None else n_null
    if feats.size > DENSE_FEATURES:  # no cap: never F x F; the exact percentile in blocks
        p5, n_pairs, n_const = blocked_pair_percentile(Xs, params.pct)
        nulls = [blocked_pair_percentile(permute_columns(Xs, rng), params.pct)[0] for _ in range(draws if n_pairs else 0)]
        corr = null_corr = np.empty(0)
    else:
        corr, n_const = pair_correlations(Xs)
        p5, n_pairs = percentile(corr, params.pct), int(corr.size)
        nulls, null_corr = [], np.empty(0)
        for _ in range(draws if corr.size else 0):
            null_corr, _ = pair_correlations(permute_columns(Xs, rng))
            nulls.append(percentile(null_corr, params.pct))
    null_p5 = float(np.mean(nulls)) if nulls else float("nan")
    return GroupStats(X.shape[0], n_active, int(feats.size), n_const, n_pairs, p5, null_p5, nulls,
                      corr if keep else np.empty(0), null_corr if keep else np.empty(0))


def paper_mwu(amb: np.ndarray, unamb: np.ndarray) -> dict[str, Any]:
    """The paper's test over all pairs: ``mannwhitneyu(amb, unamb, alternative="less")``."""
    if amb.size == 0 or unamb.size == 0:
        return {"U": None, "p_less": None, "rank_biserial": None,
                "reason": "an empty group, or more than DENSE_FEATURES features (pairs not held): no test"}
    res = scipy.stats.mannwhitneyu(amb, unamb, alternative="less")
    return {"U": float(res.statistic), "p_less": float(res.pvalue),
            "rank_biserial": float(2 * res.statistic / (amb.size * unamb.size) - 1)}


@dataclass
class RivalryTest:
    """Observed per-group structure, the paper's MWU and the calibrated label-permutation test."""

    ambiguous: GroupStats
    unambiguous: GroupStats
    statistic: float  # excess_ambiguous - excess_unambiguous, as the permutations compute it
    p_perm: float  # calibrated, one-sided (ambiguous more rival)
    p_perm_two_sided: float
    n_perm: int
    perm_statistics: np.ndarray = field(repr=False)
    paper: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, pct: float) -> dict[str, Any]:
        return {"ambiguous": self.ambiguous.as_dict(pct), "unambiguous": self.unambiguous.as_dict(pct),
                "calibrated": {"statistic": self.statistic, "p_less": self.p_perm,
                               "p_two_sided": self.p_perm_two_sided, "n_perm": self.n_perm,
                               "what": "label permutation of T = excess_ambiguous - excess_unambiguous, "
                                       "excess = p5 - feature-marginal null p5: calibrated"},
                "paper": {**self.paper, "what": "mannwhitneyu(pairs_ambiguous, pairs_unambiguous, 'less') as in "
                                                "the paper: feature pairs are not independent draws, NOT calibrated"}}


def _excess(X: sp.csr_matrix, labels: np.ndarray, params: PaperParams, rng: np.random.Generator) -> float:
    a = group_stats(X[np.flatnonzero(labels)], params, rng, keep=False)
    u = group_stats(X[np.flatnonzero(~labels)], params, rng, keep=False)
    return a.excess - u.excess


def rivalry_test(X: sp.csr_matrix, is_ambiguous: np.ndarray, params: PaperParams = PaperParams(),
                 n_perm: int = 1000, seed: int = 0, n_jobs: int | None = None) -> RivalryTest:
    """The paper's statistics and the calibrated test on pooled (ambiguous + unambiguous) rows.

    X holds one row per pooled question; ``is_ambiguous`` labels them. Every permutation
    re-runs the whole protocol on the relabelled groups (filter, cap, correlations, null), so
    the test accounts for all of it. Permutation i draws from its own stream
    (``default_rng([seed, i])``): the result does not depend on ``n_jobs`` (threads; scipy's
    sparse products and numpy's sorts release the GIL).
    """
    is_amb = np.asarray(is_ambiguous, bool)
    X = sp.csr_matrix(X)
    # Columns that can pass the mean filter in some group: their sum over all pooled rows must
    # exceed min_mean times the smaller group's size. Ids stay in order, so the cap's choice
    # (by position in the sorted list of active features) is the same as on the full matrix.
    n_small = max(1, min(int(is_amb.sum()), int((~is_amb).sum())))
    col_sum = np.asarray(X.sum(axis=0)).ravel()
    Xc = X[:, np.flatnonzero(col_sum > max(params.min_mean, 0.0) * n_small)].tocsr()

    rng = np.random.default_rng([seed, n_perm + 1])
    T = _excess(Xc, is_amb, params, np.random.default_rng([seed, n_perm]))
    a = group_stats(Xc[np.flatnonzero(is_amb)], params, rng, n_null=params.report_draws)
    u = group_stats(Xc[np.flatnonzero(~is_amb)], params, rng, n_null=params.report_draws)

    def one(i: int) -> float:
        r = np.random.default_rng([seed, i])
        return _excess(Xc, r.permutation(is_amb), params, r)

    jobs = n_jobs or min(4, os.cpu_count() or 1)
    if jobs > 1 and n_perm > 1:
        with ThreadPoolExecutor(jobs) as ex:
            perms = np.fromiter(ex.map(one, range(n_perm)), float, n_perm)
    else:
        perms = np.fromiter((one(i) for i in range(n_perm)), float, n_perm)
    finite = perms[np.isfinite(perms)]
    if np.isfinite(T) and finite.size:
        p_less = float((1 + (finite <= T).sum()) / (1 + finite.size))
        p_greater = float((1 + (finite >= T).sum()) / (1 + finite.size))
        p_two = min(1.0, 2 * min(p_less, p_greater))
    else:
        p_less = p_two = float("nan")
    return RivalryTest(a, u, T, p_less, p_two, int(finite.size), perms, paper_mwu(a.correlations, u.correlations))


# ------------------------------------------------------- per-question scores
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


def stratified_permutation_test(score: np.ndarray, is_ambiguous: np.ndarray, strata: np.ndarray,
                                n_perm: int = 1000, seed: int = 0) -> dict[str, Any]:
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
    out: dict[str, Any] = {"n_informative_questions": used, "n_strata": n_strata, "n_perm": n_perm,
                           "n_scored": int(ok.sum())}
    if wsum == 0:
        out.update(statistic=None, p_less=None, p_two_sided=None, reason="no stratum holds both groups: no test")
        return out
    T, perms = obs / wsum, perm_sum / wsum
    p_less = (1 + (perms <= T + 1e-12).sum()) / (1 + n_perm)
    p_greater = (1 + (perms >= T - 1e-12).sum()) / (1 + n_perm)
    out.update(statistic=float(T), p_less=float(p_less), p_two_sided=float(min(1.0, 2 * min(p_less, p_greater))))
    return out


def compare_groups(amb: np.ndarray, unamb: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mann-Whitney U (two-sided, and one-sided: ambiguous lower), rank-biserial effect size
    r = 2 U_amb / (n_amb n_unamb) - 1 (negative: ambiguous scores lower), and a percentile
    bootstrap CI of median(amb) - median(unamb). Not conditional on anything: descriptive."""
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


# ------------------------------------------------- rivalry vs correctness (exp3)
def decoder_cosine_score(idx: np.ndarray, val: np.ndarray, W_dec_unit: np.ndarray, top: int = 50,
                         min_act: float = 0.01, pct: float = 5.0) -> np.ndarray:
    """The paper's per-prompt score: for each row of (Q, k) prompt-end codes, the features
    with activation > min_act (the ``top`` strongest), p5 of the pairwise cosines of their
    decoder directions (rows of ``W_dec_unit``, unit norm, (d_sae, d_model)); 0.0 with fewer
    than two such features, as in the paper. Lower: more rival directions."""
    out = np.zeros(idx.shape[0])
    for q in range(idx.shape[0]):
        act = val[q] > min_act
        ids, v = idx[q][act].astype(np.int64), val[q][act]
        if ids.size > top:
            ids = ids[np.argsort(v, kind="stable")[-top:]]
        if ids.size < 2:
            continue
        D = W_dec_unit[ids]
        C = D @ D.T
        out[q] = float(np.percentile(C[np.triu_indices(ids.size, k=1)], pct))
    return out


def auroc(labels: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for boolean ``labels`` (ties count half):
    the Mann-Whitney U of the positives over n_pos n_neg."""
    y = np.asarray(labels, bool)
    s = np.asarray(score, float)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    r = scipy.stats.rankdata(s)
    return float((r[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def auroc_with_ci(labels: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, Any]:
    """AUROC and its percentile bootstrap CI (questions resampled with replacement)."""
    y = np.asarray(labels, bool)
    s = np.asarray(score, float)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    value = auroc(y, s)
    out: dict[str, Any] = {"auroc": value, "n": int(y.size), "n_positive": int(y.sum())}
    if not np.isfinite(value) or n_boot == 0:
        out["ci"] = None
        return out
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, 100):
        idx = rng.integers(0, y.size, (min(100, n_boot - start), y.size))
        yb, sb = y[idx], s[idx]
        r = scipy.stats.rankdata(sb, axis=1)
        npos = yb.sum(1)
        nneg = y.size - npos
        with np.errstate(invalid="ignore", divide="ignore"):
            boots.append(((r * yb).sum(1) - npos * (npos + 1) / 2) / (npos * nneg))
    b = np.concatenate(boots)
    b = b[np.isfinite(b)]
    a = (1 - level) / 2
    out["ci"] = [float(np.quantile(b, a)), float(np.quantile(b, 1 - a))] if b.size else None
    return out


def roc_curve(labels: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, from the highest score."""
    y = np.asarray(labels, bool)
    s = np.asarray(score, float)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), y.size - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


# ------------------------------------------------------------- multiple layers
def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error across layers); NaN stays NaN."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out
