"""Sparse building blocks: a group's question x feature matrix, the paper's feature filter,
exact pair correlations (dense for the capped protocol, blocked in bounded memory without a
cap) and the two nulls: the fixed-fixed one (each question's count of active features and each
feature's values kept: curveball trades) and the feature-marginal one (each feature's values
moved to random questions; counts per question not kept)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sp

# Above this many features the pair correlations are never held at once (F x F): the
# percentile is computed exactly in blocks and the paper's MWU over pairs is not run.
DENSE_FEATURES = 4096


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
    if sp.isspmatrix_csr(X):
        mean = np.bincount(X.indices, weights=X.data, minlength=X.shape[1]) / Q
    else:
        mean = np.asarray(X.sum(axis=0)).ravel() / Q
    keep = mean > min_mean
    if min_questions > 1:
        keep &= np.diff(X.tocsc().indptr) >= min_questions
    active = np.flatnonzero(keep)
    n_active = int(active.size)
    if max_features is not None and active.size > max_features:
        active = active[_cap_choice(seed, n_active, max_features)]
    return active, n_active


@lru_cache(maxsize=256)
def _cap_choice(seed: int, n: int, k: int) -> np.ndarray:
    """``RandomState(seed).choice(active, k, replace=False)`` depends on ``active`` only through
    its length: the positions it picks, computed once per length."""
    return np.random.RandomState(seed).choice(n, k, replace=False)


@lru_cache(maxsize=64)
def _upper(F: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(F, k=1)


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
    return C[_upper(C.shape[0])], n_const


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


def curveball(X: sp.spmatrix, rng: np.random.Generator, rounds: int, cells: np.ndarray | None = None
              ) -> sp.csr_matrix:
    """The fixed-fixed null of co-occurrence analysis: a random question x feature matrix with
    every question's number of active features and every feature's values (so its firing count)
    kept, by global curveball rounds (Carstens, Berger & Strona 2016). Each round pairs the rows
    at random, within their ``cells`` label (rows labelled -1 stay as they are); for every pair
    the features active in exactly one of the two rows are dealt back at random, each row
    keeping its count, and each value travels with its cell. The chain is symmetric, so its
    stationary law is uniform over such matrices and a draw from the data and draws from that
    draw are exchangeable under the null (Besag & Clifford 1989): exact, however well it mixes.
    A TopK SAE gives every question exactly k features, and features of a small pool compete
    for those slots; this null keeps that competition, the feature-marginal one does not."""
    X = sp.coo_matrix(X)
    Q, F = X.shape
    rows, cols = X.row.astype(np.int64), X.col.astype(np.int64)
    cell = np.zeros(Q, np.int64) if cells is None else np.asarray(cells, np.int64)
    movable = cell >= 0
    for _ in range(rounds):
        order = np.flatnonzero(movable)
        order = order[np.lexsort((rng.random(order.size), cell[order]))]  # by cell, random within
        c = cell[order]
        first = np.r_[True, c[1:] != c[:-1]]
        pos = np.arange(order.size) - np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        size = np.bincount(np.cumsum(first) - 1)[np.cumsum(first) - 1]
        lead = (pos % 2 == 0) & (pos + 1 < size)  # the first row of each pair
        n_pairs = int(lead.sum())
        if n_pairs == 0:
            break
        pair_rows = np.stack([order[lead], order[np.flatnonzero(lead) + 1]], axis=1)
        pid = np.full(Q, -1, np.int64)
        side = np.zeros(Q, np.int64)
        pid[pair_rows[:, 0]] = pid[pair_rows[:, 1]] = np.arange(n_pairs)
        side[pair_rows[:, 1]] = 1
        p = pid[rows]
        live = np.flatnonzero(p >= 0)
        key = p[live] * F + cols[live]
        o = np.argsort(key)
        ks = key[o]
        same = ks[1:] == ks[:-1]  # a feature active in both rows of a pair stays
        shared = np.zeros(live.size, bool)
        shared[1:] |= same
        shared[:-1] |= same
        trade = live[o[~shared]]
        if not trade.size:
            continue
        tp = p[trade]
        n0 = np.bincount(tp, weights=side[rows[trade]] == 0, minlength=n_pairs)
        o2 = np.argsort(tp + rng.random(trade.size))  # a random order of each pair's tradable cells
        tp2 = tp[o2]
        rank = np.arange(trade.size) - np.searchsorted(tp2, tp2)
        rows[trade[o2]] = pair_rows[tp2, (rank >= n0[tp2]).astype(np.int64)]
    return sp.csr_matrix((X.data, (rows, cols)), shape=(Q, F))


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
