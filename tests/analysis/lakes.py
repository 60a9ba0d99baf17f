"""Synthetic prompt-end code matrices of known truth for the rivalry tests and
``benchmarks/bench_rivalry.py --calibration``: each generator returns ``(X, is_ambiguous)``
(plus strata where it has them), X a question x feature CSR matrix of activations.

Two ways codes are made, as real SAEs make them:

* **TopK** (the 35B-A3B's Qwen-Scope SAEs): every question has exactly k active features, drawn
  from a pool; with ``negative`` a share of the values is negative (Qwen-Scope's raw TopK keeps
  them). A small pool makes its features compete for the k slots: a negative dependence that
  grows with firing frequency and is no rivalry.
* **ReLU + L1** (the 9B release): features fire independently, so counts vary per question.

None has rivalry unless its name says so (``*_rival``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def pooled(Xa, Xu) -> tuple[sp.csr_matrix, np.ndarray]:
    """Stack an ambiguous and an unambiguous group (dense or sparse) into (X, is_ambiguous)."""
    X = sp.vstack([sp.csr_matrix(Xa), sp.csr_matrix(Xu)]).tocsr()
    return X, np.r_[np.ones(Xa.shape[0], bool), np.zeros(Xu.shape[0], bool)]


# ------------------------------------------------------------------- ReLU-style
def independent_codes(rng, n, d, rate, scale=1.0):
    """n x d activations, every feature independent, firing with probability ``rate``."""
    return (rng.random((n, d)) < rate) * rng.exponential(scale, (n, d))


def planted_rival(rng, n, d, rate, clusters=(range(0, 12), range(12, 24)), cluster_rate=0.3, exclusive=True):
    """Independent background features at ``rate``, and two clusters whose features fire at
    ``cluster_rate``: ``exclusive`` clusters never fire together (each question picks one,
    whose features then fire with probability 2 * cluster_rate); otherwise every cluster
    feature fires independently, at the same marginal rate."""
    X = independent_codes(rng, n, d, rate)
    pick = rng.random(n) < 0.5
    for c, on in zip(clusters, (pick, ~pick)):
        c = list(c)
        if exclusive:
            X[:, c] = (rng.random((n, len(c))) < 2 * cluster_rate) * rng.exponential(1.0, (n, len(c))) * on[:, None]
        else:
            X[:, c] = independent_codes(rng, n, len(c), cluster_rate)
    return X


def frequency_lake(rng, na, nu, d=80):
    """ReLU-style, no co-activation structure anywhere; the groups differ only in how often
    features fire (12% vs 2.5%)."""
    return pooled(independent_codes(rng, na, d, 0.12), independent_codes(rng, nu, d, 0.025))


def diversity_lake(rng, na, nu, d=80, vocab=30):
    """Prompt-end codes that represent each candidate answer: ambiguous questions have 2-6
    candidates, unambiguous ones 1; each answer-type feature fires independently with
    probability candidates / vocab, so the ambiguous group fires more answer features and with
    a spread of rates. Background features as in the frequency lake. No rivalry anywhere."""
    out = []
    for n, cands in ((na, rng.integers(2, 7, na)), (nu, np.ones(nu, int))):
        X = independent_codes(rng, n, d, 0.05)
        X[:, :vocab] = (rng.random((n, vocab)) < (cands / vocab)[:, None]) * rng.exponential(1.0, (n, vocab))
        out.append(X)
    return pooled(*out)


def relu_rival_lake(rng, na, nu, d=100):
    """Planted rivalry, ReLU-style: two clusters exclusive in ambiguous questions, independent
    at the same firing rate in unambiguous ones."""
    return pooled(planted_rival(rng, na, d, 0.08), planted_rival(rng, nu, d, 0.08, exclusive=False))


# ------------------------------------------------------------------- TopK-style
def topk_matrix(rng, cols: np.ndarray, d: int, negative: float = 0.0) -> sp.csr_matrix:
    """(n, k) active feature ids per question -> CSR with exponential values; a share
    ``negative`` of them negative (raw Qwen-Scope TopK)."""
    n, k = cols.shape
    vals = rng.exponential(1.0, (n, k))
    if negative:
        neg = rng.random((n, k)) < negative
        vals[neg] = -rng.exponential(0.2, int(neg.sum()))
    return sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(n), k), cols.ravel())), shape=(n, d))


def draw_k(rng, n: int, pool: np.ndarray, k: int) -> np.ndarray:
    """Exactly k distinct features per question, uniformly from ``pool``."""
    pool = np.asarray(pool)
    return pool[np.argsort(rng.random((n, pool.size)), axis=1)[:, :k]]


def pools_lake(rng, na, nu, amb_pool=400, unamb_pool=8000, k=50, d=8192, negative=0.1):
    """TopK, no rivalry: every question codes exactly k features; ambiguous ones draw them from
    a pool of ``amb_pool`` features, unambiguous ones from ``unamb_pool`` (the first features
    are shared). The small pool's features compete for the k slots: the fixed count alone."""
    return pooled(topk_matrix(rng, draw_k(rng, na, np.arange(amb_pool), k), d, negative),
                  topk_matrix(rng, draw_k(rng, nu, np.arange(unamb_pool), k), d, negative))


def topk_diversity_lake(rng, na, nu, k=50, vocab=30, pool=2000, negative=0.1):
    """TopK with answer diversity, no rivalry: ambiguous questions code 2-6 candidate-answer
    features (of ``vocab``), unambiguous ones 1; the other slots of the k come from a shared
    background pool."""
    d = vocab + pool
    out = []
    for n, lo, hi in ((na, 2, 7), (nu, 1, 2)):
        cands = rng.integers(lo, hi, n)
        cols = np.empty((n, k), np.int64)
        for q in range(n):
            cols[q, :cands[q]] = rng.choice(vocab, cands[q], replace=False)
            cols[q, cands[q]:] = vocab + rng.choice(pool, k - cands[q], replace=False)
        out.append(topk_matrix(rng, cols, d, negative))
    return pooled(*out)


def topk_relation_lake(rng, na, nu, k=50, pool=300, amb_share=(0.4, 0.3, 0.2, 0.1), negative=0.1):
    """TopK with question types, no rivalry within a type: relation r codes its k from its own
    pool of ``pool`` features (disjoint pools: types never share features); the ambiguous
    group is mostly of the first relations, the unambiguous group mostly of the last ones.
    Returns (X, is_ambiguous, relation)."""
    R = len(amb_share)
    d = R * pool
    mats, rels = [], []
    for n, share in ((na, np.asarray(amb_share)), (nu, np.asarray(amb_share)[::-1])):
        counts = rng.multinomial(n, share / share.sum())
        for r, c in enumerate(counts):
            mats.append(topk_matrix(rng, draw_k(rng, c, r * pool + np.arange(pool), k), d, negative))
            rels += [f"P{r}"] * c
    X = sp.vstack(mats).tocsr()
    return X, np.r_[np.ones(na, bool), np.zeros(nu, bool)], np.array(rels, dtype=object)


def topk_rival(rng, n, exclusive, k=50, pool=200, cluster=40, in_cluster=20, d=512, negative=0.1):
    """TopK codes with two feature clusters: every question puts ``in_cluster`` of its k slots in
    the clusters and the rest in a background pool; ``exclusive`` questions pick one cluster
    (its features never fire with the other's: rivalry), otherwise the slots go to the union of
    both clusters (the same firing rates, no rivalry)."""
    c1, c2 = np.arange(cluster), cluster + np.arange(cluster)
    cols = np.empty((n, k), np.int64)
    one = rng.random(n) < 0.5
    for q in range(n):
        cl = (c1 if one[q] else c2) if exclusive else np.r_[c1, c2]
        cols[q, :in_cluster] = rng.choice(cl, in_cluster, replace=False)
        cols[q, in_cluster:] = 2 * cluster + rng.choice(pool, k - in_cluster, replace=False)
    return topk_matrix(rng, cols, d, negative)


def topk_rival_lake(rng, na, nu, **kw):
    """Planted rivalry, TopK: the clusters are exclusive in ambiguous questions only."""
    return pooled(topk_rival(rng, na, True, **kw), topk_rival(rng, nu, False, **kw))


def topk_equal_rival_lake(rng, na, nu, **kw):
    """The same rivalry in both groups (one generator): no difference to find, though both
    groups have more structure than their margins make."""
    return pooled(topk_rival(rng, na, True, **kw), topk_rival(rng, nu, True, **kw))


def degenerate_lake(rng, na, nu, k=5, d=200_000):
    """Every feature fires in at most one question of a group (k of a huge pool): every p5 sits
    at the tie value -1/(n-1), whatever the labels; the statistic is rounding only."""
    return pooled(topk_matrix(rng, rng.permutation(d)[: na * k].reshape(na, k), d),
                  topk_matrix(rng, rng.permutation(d)[: nu * k].reshape(nu, k), d))


# The study's numbers (the lakes: exactly 50 of 400 or 8,000 features) and a smaller
# version of each with the same structure, for the test suite.
STUDY = {"topk_pools": {}, "topk_diversity": {}, "topk_relations": {}, "topk_equal_rivalry": {},
         "relu_frequency": {}, "relu_diversity": {}, "topk_rivalry": {}, "relu_rivalry": {}}
SMALL = {"topk_pools": dict(k=20, amb_pool=160, unamb_pool=3200, d=3328),
         "topk_diversity": dict(k=20, pool=800), "topk_relations": dict(k=20, pool=120),
         "topk_equal_rivalry": dict(k=20, pool=80, cluster=16, in_cluster=8, d=160),
         "relu_frequency": {}, "relu_diversity": {},
         "topk_rivalry": dict(k=20, pool=60, cluster=24, in_cluster=10, d=120), "relu_rivalry": {}}
GENERATORS = {"topk_pools": pools_lake, "topk_diversity": topk_diversity_lake, "topk_relations": topk_relation_lake,
              "topk_equal_rivalry": topk_equal_rival_lake, "relu_frequency": frequency_lake,
              "relu_diversity": diversity_lake, "topk_rivalry": topk_rival_lake, "relu_rivalry": relu_rival_lake}
NULL_SETTINGS = ["topk_pools", "topk_diversity", "topk_relations", "topk_equal_rivalry", "relu_frequency",
                 "relu_diversity"]  # no rivalry difference between the groups
POWER_SETTINGS = ["topk_rivalry", "relu_rivalry"]  # rivalry planted in the ambiguous group
SPLITS = ((64, 448), (448, 64), (256, 256))


def make(name: str, rng, na: int, nu: int, small: bool = False):
    """(X, is_ambiguous, strata or None) of one setting, at the study's size or the small one."""
    out = GENERATORS[name](rng, na, nu, **(SMALL if small else STUDY)[name])
    return out if len(out) == 3 else (*out, None)
