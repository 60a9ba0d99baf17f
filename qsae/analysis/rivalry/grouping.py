"""Entropy groups: the paper's first-word entropy, distinct completions, the ambiguous /
unambiguous split. Imports numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Rule = Literal["thresholds", "median", "quantile", "threshold"]
AMBIGUOUS, UNAMBIGUOUS, EXCLUDED = "ambiguous", "unambiguous", "left_out"  # results before 2026-12 stored ""
NOT_CAPTURED = "not_captured"  # questions of a partial lake: in no group, not counted as left out
_LABEL = f"<U{max(map(len, (AMBIGUOUS, UNAMBIGUOUS, EXCLUDED, NOT_CAPTURED)))}"  # every label fits


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
    labels: np.ndarray  # str per question: ambiguous / unambiguous / left_out
    rule: str
    cutoffs: dict[str, float]

    def summary(self, entropy: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, **self.cutoffs}
        for g in (AMBIGUOUS, UNAMBIGUOUS):
            e = entropy[self.labels == g]
            out[g] = {"n": int(e.size), "entropy_min": float(e.min()) if e.size else None,
                      "entropy_max": float(e.max()) if e.size else None}
        out["left_out"] = int((self.labels == EXCLUDED).sum())
        out["not_captured"] = int((self.labels == NOT_CAPTURED).sum())
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
        return Grouping(labels.astype(_LABEL), rule, {})
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
    return Grouping(labels.astype(_LABEL), rule, cutoffs)
