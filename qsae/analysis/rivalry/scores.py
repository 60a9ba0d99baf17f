"""Rivalry against correctness (the paper's experiment 3): the per-prompt decoder-cosine
score, AUROC with paired bootstrap CIs, ROC curves, Holm across layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats


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


def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of (B, n) scores ``s`` for the matching rows of labels ``y``."""
    r = scipy.stats.rankdata(s, axis=1)
    npos = y.sum(1)
    nneg = y.shape[1] - npos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * y).sum(1) - npos * (npos + 1) / 2) / (npos * nneg)


@dataclass
class PairedAUROC:
    """AUROCs of several scores for the same labels on one set of bootstrap resamples: each
    AUROC's CI and, for each score against the reference, the difference and its CI."""

    n: int
    n_positive: int
    left_out: int
    resamples: int
    reference: str
    auroc: dict[str, float] = field(default_factory=dict)
    ci: dict[str, list[float] | None] = field(default_factory=dict)
    difference: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "n_positive": self.n_positive, "left_out": self.left_out, "resamples": self.resamples,
                "reference": self.reference, "auroc": self.auroc, "ci": self.ci, "difference": self.difference}


def paired_auroc(labels: np.ndarray, scores: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, reference: str | None = None) -> PairedAUROC:
    """AUROC of several scores for the same labels, with one set of bootstrap resamples for
    all of them (questions resampled with replacement), so that the difference between the
    first score (or ``reference``) and each other one has its own percentile CI: "better than
    the baseline" is then a statement the CIs can support. Questions with a non-finite score
    in any of them are left out (counted)."""
    y = np.asarray(labels, bool)
    names = list(scores)
    S = np.stack([np.asarray(scores[k], float) for k in names])
    ok = np.isfinite(S).all(axis=0)
    y, S = y[ok], S[:, ok]
    ref = reference or names[0]
    out = PairedAUROC(int(y.size), int(y.sum()), int((~ok).sum()), int(n_boot), ref)
    for k, s in zip(names, S):
        out.auroc[k] = auroc(y, s)
    if n_boot == 0 or not np.isfinite(out.auroc[ref]):
        return out
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in names}
    for start in range(0, n_boot, 100):
        idx = rng.integers(0, y.size, (min(100, n_boot - start), y.size))
        yb = y[idx]
        for k, s in zip(names, S):
            boots[k].append(_auroc_rows(yb, s[idx]))
    a = (1 - level) / 2
    B = {k: np.concatenate(v) for k, v in boots.items()}
    for k in names:
        b = B[k][np.isfinite(B[k])]
        out.ci[k] = [float(np.quantile(b, a)), float(np.quantile(b, 1 - a))] if b.size else None
        if k != ref:
            d = B[ref] - B[k]
            d = d[np.isfinite(d)]
            out.difference[k] = {"value": out.auroc[ref] - out.auroc[k],
                                 "ci": [float(np.quantile(d, a)), float(np.quantile(d, 1 - a))] if d.size else None,
                                 "what": f"AUROC({ref}) - AUROC({k}) on the same resamples"}
    return out


def roc_curve(labels: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, from the highest score."""
    y = np.asarray(labels, bool)
    s = np.asarray(score, float)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if y.size == 0:
        return np.zeros(1), np.zeros(1)
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
