"""Compare two SAEs (base vs fine-tuned): feature matching and firing shifts in the lakes.

Matching: the cosine similarity of decoder directions (one unit row per feature), computed
in row blocks, never as a full d_sae_a x d_sae_b matrix (two 32k SAEs at d_model 4096 fit in
a few hundred MB). Each feature keeps its top ``candidates`` partners in both directions;
the optimal one-to-one assignment maximising the total similarity is solved on that sparse
candidate graph with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``. Dummy nodes
let any feature stay unmatched: pairing (i, j) costs 2 - s_ij, leaving a feature unmatched
costs 1 per side, and the dummy-dummy edge that pairing frees costs ~0, so a pair is taken
exactly when it raises the total similarity (s_ij > 0). With ``candidates`` >= the width the
graph is complete and the assignment is the exact optimum.

A feature with no counterpart above ``threshold`` (its best cosine over *all* features of the
other SAE, not just its assigned partner) has *emerged* (in the fine-tuned SAE) or *vanished*
(from the base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import min_weight_full_bipartite_matching


def unit_rows(W: np.ndarray) -> np.ndarray:
    """Decoder rows (one per feature) scaled to unit norm; zero rows stay zero."""
    W = np.asarray(W, dtype=np.float32)
    n = np.linalg.norm(W, axis=1, keepdims=True)
    return W / np.where(n > 0, n, 1)


@dataclass
class Candidates:
    rows: np.ndarray
    cols: np.ndarray
    sims: np.ndarray
    best_a: np.ndarray  # each A feature's best cosine over all B features
    best_b: np.ndarray
    argbest_a: np.ndarray
    argbest_b: np.ndarray


def candidate_pairs(A: np.ndarray, B: np.ndarray, k: int = 8, block: int = 2048) -> Candidates:
    """Top-k partners of every row of A among B and of every row of B among A, blockwise."""
    na, nb = A.shape[0], B.shape[0]
    ka, kb = min(k, nb), min(k, na)
    rows, cols, sims = [], [], []
    col_top_val = np.full((kb, nb), -np.inf, dtype=np.float32)
    col_top_idx = np.zeros((kb, nb), dtype=np.int64)
    best_a = np.empty(na, np.float32)
    argbest_a = np.empty(na, np.int64)
    for start in range(0, na, block):
        C = A[start:start + block] @ B.T  # (block, nb)
        part = np.argpartition(-C, ka - 1, axis=1)[:, :ka]
        r = np.repeat(np.arange(start, start + C.shape[0]), ka)
        rows.append(r)
        cols.append(part.ravel())
        sims.append(np.take_along_axis(C, part, 1).ravel())
        argbest_a[start:start + C.shape[0]] = C.argmax(1)
        best_a[start:start + C.shape[0]] = C.max(1)
        # merge this block's column-wise top-kb into the running column top-kb
        kk = min(kb, C.shape[0])
        cpart = np.argpartition(-C, kk - 1, axis=0)[:kk]
        cval = np.take_along_axis(C, cpart, 0)
        allv = np.concatenate([col_top_val, cval])
        alli = np.concatenate([col_top_idx, cpart + start])
        keep = np.argpartition(-allv, kb - 1, axis=0)[:kb]
        col_top_val = np.take_along_axis(allv, keep, 0)
        col_top_idx = np.take_along_axis(alli, keep, 0)
    rows.append(col_top_idx.ravel())
    cols.append(np.tile(np.arange(nb), kb))
    sims.append(col_top_val.ravel())
    order = np.argsort(col_top_val, axis=0)[::-1]
    best_b = np.take_along_axis(col_top_val, order[:1], 0)[0]
    argbest_b = np.take_along_axis(col_top_idx, order[:1], 0)[0]
    r, c, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float64)
    ok = np.isfinite(s)
    pairs = np.unique(np.stack([r[ok], c[ok]]), axis=1, return_index=True)[1]
    r, c, s = r[ok][pairs], c[ok][pairs], s[ok][pairs]
    return Candidates(r, c, s, best_a, best_b, argbest_a, argbest_b)


def optimal_assignment(cand: Candidates, na: int, nb: int, eps: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-total-similarity one-to-one matching over the candidate edges (features may stay unmatched)."""
    pos = cand.sims > 0
    r, c, s = cand.rows[pos], cand.cols[pos], cand.sims[pos]
    n = na + nb
    # left: A rows (0..na-1) then dummy rows for B (na..na+nb-1);
    # right: B cols (0..nb-1) then dummy cols for A (nb..nb+na-1)
    ii = np.concatenate([r, np.arange(na), na + np.arange(nb), na + c])
    jj = np.concatenate([c, nb + np.arange(na), np.arange(nb), nb + r])
    ww = np.concatenate([2.0 - s, np.ones(na), np.ones(nb), np.full(r.size, eps)])
    graph = sp.csr_matrix((ww, (ii, jj)), shape=(n, n))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    partner = np.empty(n, dtype=np.int64)
    partner[row_ind] = col_ind
    a_idx = np.arange(na)
    b_idx = partner[:na]
    real = b_idx < nb
    a_idx, b_idx = a_idx[real], b_idx[real]
    lookup = dict(zip(zip(r.tolist(), c.tolist()), s.tolist()))
    sims = np.array([lookup[(int(i), int(j))] for i, j in zip(a_idx, b_idx)], dtype=np.float64)
    return a_idx, b_idx, sims


@dataclass
class FeatureMatch:
    a: np.ndarray  # matched base features
    b: np.ndarray  # their fine-tuned partners
    similarity: np.ndarray
    best_a: np.ndarray  # best cosine of each base feature to any fine-tuned feature
    best_b: np.ndarray
    threshold: float

    @property
    def vanished(self) -> np.ndarray:
        return np.flatnonzero(self.best_a < self.threshold)

    @property
    def emerged(self) -> np.ndarray:
        return np.flatnonzero(self.best_b < self.threshold)

    def summary(self) -> dict[str, Any]:
        return {
            "d_sae_base": int(self.best_a.size), "d_sae_finetuned": int(self.best_b.size),
            "matched": int(self.a.size), "matched_above_0.9": int((self.similarity > 0.9).sum()),
            "matched_above_threshold": int((self.similarity >= self.threshold).sum()),
            "threshold": self.threshold, "emerged": int(self.emerged.size), "vanished": int(self.vanished.size),
            "mean_matched_similarity": float(self.similarity.mean()) if self.similarity.size else None,
        }


def match_features(W_dec_a: np.ndarray, W_dec_b: np.ndarray, threshold: float = 0.7, candidates: int = 8,
                   block: int = 2048) -> FeatureMatch:
    """Match two SAEs' features by decoder cosine; see the module docstring."""
    A, B = unit_rows(W_dec_a), unit_rows(W_dec_b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the SAEs read different widths: d_in {A.shape[1]} vs {B.shape[1]}")
    cand = candidate_pairs(A, B, candidates, block)
    a, b, s = optimal_assignment(cand, A.shape[0], B.shape[0])
    return FeatureMatch(a, b, s, cand.best_a.astype(np.float64), cand.best_b.astype(np.float64), threshold)


# ------------------------------------------------------------------ firing in lakes
def firing_stats(ds, layer: int, which: str = "completion", questions: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """(frequency, mean activation when firing, rows) per feature from a lake's codes at the
    completions' ends (``which="completion"``) or the prompts' ends (``"prompt"``), over the
    finished questions (or the boolean mask ``questions``)."""
    idx_name, val_name = ("codes_idx", "codes_val") if which == "completion" else ("prompt_codes_idx", "prompt_codes_val")
    d_sae = int(ds.attrs["d_sae"])
    done = ds.done.values if questions is None else questions
    idx = ds[idx_name].sel(layer=layer).values[done]
    val = ds[val_name].sel(layer=layer).values[done]
    active = val != 0  # raw (Qwen-Scope) TopK codes may be negative: still active
    counts = np.bincount(idx[active].astype(np.int64), minlength=d_sae)
    sums = np.bincount(idx[active].astype(np.int64), weights=val[active].astype(np.float64), minlength=d_sae)
    tokens = int(np.prod(idx.shape[:-1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_act = np.where(counts > 0, sums / counts, 0.0)
    return counts / max(tokens, 1), mean_act, tokens
