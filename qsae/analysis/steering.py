"""The steering experiment's statistics (the rivalry paper's experiment 2), numpy only: the rival
pairs the paper tests, control pairs that are no rivals but fire as often, and the tests of
whether steering along a rival pair's decoder difference flips more answers than controls.

The paper (``experiments/exp2_causal.py``) reports each pair's flip rate beside one isotropic
random direction's and counts the pairs above it; whether that count is surprising is never
tested, and "random" is no SAE feature pair. Here, per multiplier:

* **per pair**: the rank of the rival pair's flip rate among R control pairs' (decoder
  differences of feature pairs of the same group, matched in firing frequency, not rivals): a
  p-value (1 + #{controls >= rival}) / (R + 1), its resolution 1 / (R + 1);
* **across pairs**: T = mean flip rate of the rival pairs - mean flip rate of the controls,
  against the same T with the "rival" labels permuted over rival and control directions
  (exact when rival directions are no different from controls), Holm across multipliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from .rivalry.correlations import constant_columns, select_features
from .rivalry.scores import holm


@dataclass
class Pair:
    """Two features of a group and the correlation of their codes across its questions."""

    feature_i: int
    feature_j: int
    correlation: float
    frequency_i: float = 0.0
    frequency_j: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"feature_i": self.feature_i, "feature_j": self.feature_j, "correlation": self.correlation,
                "frequency_i": self.frequency_i, "frequency_j": self.frequency_j}


@dataclass
class GroupCorrelations:
    """The exp1 matrix of a group: its selected features (the paper's mean filter and cap, constant
    columns out), their Pearson correlations (np.corrcoef, as the paper) and firing frequencies."""

    features: np.ndarray
    corr: np.ndarray
    frequency: np.ndarray


def group_correlations(X: sp.csr_matrix, min_mean: float = 0.01, max_features: int | None = 300,
                       feature_seed: int = 42) -> GroupCorrelations:
    """The paper's correlation matrix of one group's prompt-end codes (questions x d_sae)."""
    feats, _ = select_features(X, min_mean, max_features, feature_seed)
    Xs = sp.csc_matrix(X[:, feats])
    good = ~constant_columns(Xs)
    feats, Xs = feats[good], Xs[:, np.flatnonzero(good)]
    D = Xs.toarray()
    corr = np.corrcoef(D.T) if feats.size >= 2 else np.empty((feats.size, feats.size))
    return GroupCorrelations(feats, np.atleast_2d(corr), (D != 0).mean(axis=0))


def rival_pairs(g: GroupCorrelations, top: int = 50) -> list[Pair]:
    """The ``top`` most negative entries of the upper triangle, most negative first (the paper's
    ``find_top_rival_pairs``)."""
    rows, cols = np.triu_indices(g.features.size, k=1)
    values = g.corr[rows, cols]
    order = np.argsort(values, kind="stable")[:top]
    return [Pair(int(g.features[rows[i]]), int(g.features[cols[i]]), float(values[i]),
                 float(g.frequency[rows[i]]), float(g.frequency[cols[i]])) for i in order]


def control_pairs(g: GroupCorrelations, rivals: list[Pair], n: int, rng: np.random.Generator,
                  window: int = 5) -> list[Pair]:
    """``n`` pairs of the group's features that are no rivals (correlation at or above the median
    of all pairs) and fire about as often as a rival pair: for rival pair r (taken in turn), each
    side is drawn among the ``window`` features nearest in firing frequency to r's side."""
    F = g.features.size
    if F < 4 or not rivals:
        return []
    iu = np.triu_indices(F, k=1)
    median = float(np.median(g.corr[iu]))
    rank = {int(f): i for i, f in enumerate(g.features)}
    by_freq = np.argsort(g.frequency, kind="stable")
    pos = np.empty(F, np.int64)
    pos[by_freq] = np.arange(F)
    taken = {(min(p.feature_i, p.feature_j), max(p.feature_i, p.feature_j)) for p in rivals}
    out: list[Pair] = []
    tries = 0
    while len(out) < n and tries < 200 * n:
        r = rivals[len(out) % len(rivals)]
        tries += 1
        picks = []
        for f in (r.feature_i, r.feature_j):
            p = pos[rank[f]]
            lo, hi = max(0, p - window), min(F, p + window + 1)
            picks.append(int(by_freq[rng.integers(lo, hi)]))
        a, b = picks
        key = (min(g.features[a], g.features[b]), max(g.features[a], g.features[b]))
        if a == b or key in taken or g.corr[a, b] < median:
            continue
        taken.add(key)
        out.append(Pair(int(g.features[a]), int(g.features[b]), float(g.corr[a, b]), float(g.frequency[a]),
                        float(g.frequency[b])))
    return out


@dataclass
class FlipTests:
    """Per multiplier: each rival pair's rank p among the controls, and the across-pairs test."""

    multipliers: list[float]
    pair_p: np.ndarray  # (pairs, multipliers)
    pair_resolution: float
    statistic: np.ndarray  # (multipliers,) mean flip rate rival - mean flip rate control
    p_greater: np.ndarray  # (multipliers,) across pairs, one-sided: rival directions flip more
    p_holm: np.ndarray
    resolution: float
    n_controls: int
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"multipliers": self.multipliers, "pair_p": self.pair_p.tolist(), "pair_resolution":
                self.pair_resolution, "statistic": self.statistic.tolist(), "p_greater": self.p_greater.tolist(),
                "p_holm": self.p_holm.tolist(), "resolution": self.resolution, "n_controls": self.n_controls,
                "reason": self.reason, **self.extra}


def flip_tests(rival: np.ndarray, control: np.ndarray, multipliers: list[float], n_perm: int = 9999,
               seed: int = 0) -> FlipTests:
    """``rival`` (pairs, M) and ``control`` (R, M) flip rates -> the per-pair and across-pairs tests."""
    P, M = rival.shape
    R = control.shape[0]
    nan = np.full(M, np.nan)
    if R == 0 or P == 0:
        return FlipTests(list(multipliers), np.full((P, M), np.nan), np.nan, nan, nan, nan, np.nan, R,
                         reason="no control pairs: no calibrated p-value")
    pair_p = (1 + (control[None, :, :] >= rival[:, None, :]).sum(axis=1)) / (R + 1)
    pool = np.vstack([rival, control])  # (P + R, M)
    T = rival.mean(0) - control.mean(0)
    rng = np.random.default_rng([seed, 7])
    count = np.zeros(M)
    for _ in range(n_perm):
        lab = rng.permutation(P + R) < P
        t = pool[lab].mean(0) - pool[~lab].mean(0)
        count += t >= T - 1e-12
    p = (1 + count) / (n_perm + 1)
    return FlipTests(list(multipliers), pair_p, 1 / (R + 1), T, p, holm(p), 1 / (n_perm + 1), R)


def random_unit(rng: np.random.Generator, d: int, paper: bool = True) -> np.ndarray:
    """A random unit direction: the paper's (the mean of 10 normalised Gaussian vectors,
    normalised) or one normalised Gaussian (the same law: uniform on the sphere)."""
    if paper:
        v = rng.standard_normal((10, d))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(0)
    else:
        v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def flipped(text: str, baseline: str) -> bool:
    """The paper's verdict: the stripped, lower-cased steered text differs from the baseline's."""
    return text.strip().lower() != baseline.strip().lower()


def settled_flip(partial: str, baseline: str) -> bool:
    """True when a greedy row's text so far already decides a flip whatever it generates next:
    its stripped, lower-cased text is no prefix of the baseline's (every later text starts with
    it, so it differs from the baseline too). Exactly the paper's verdict, decided early."""
    if "\ufffd" in partial or "Σ" in partial:  # an incomplete character; a sigma lower() may yet change
        return False
    cur = partial.strip().lower()
    return bool(cur) and not baseline.strip().lower().startswith(cur)
