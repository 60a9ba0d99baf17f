"""The paper's across-question protocol and the calibrated test of excess rivalry.

The paper's statistics (per group: features with mean activation > 0.01, at most 300 chosen by
``RandomState(42)``, p5 of their pairwise Pearson correlations across the group's questions;
``mannwhitneyu(pairs_amb, pairs_unamb, "less")``) are reproduced as published and reported as
descriptive: feature pairs share features and questions, and p5 moves with firing frequency.

The calibrated test (``rivalry_test``) compares the groups' *excess* structure at equal sizes:
``excess = p5 - null p5``, T = excess_ambiguous - excess_unambiguous (T < 0: the ambiguous group
more rival). Its design, chosen by measuring level and power on lakes of known truth (README,
"The rivalry study"; ``benchmarks/bench_rivalry.py --calibration``):

* **The fixed-fixed null.** A TopK SAE gives every question exactly k active features; features
  drawn from a small pool compete for the k slots, a negative dependence that grows with firing
  frequency. The null keeps what TopK fixes: every question's count of active features and every
  feature's values (``correlations.curveball``). The feature-marginal null (each feature's values
  moved to random questions, counts not kept) read that competition as rivalry (``null=
  "feature_marginal"`` keeps it available, for comparison).
* **Equal group sizes.** With n questions in the smaller group (per stratum), the larger one is
  cut at random into floor(N/n) disjoint blocks of n; T compares the smaller group with the mean
  of its blocks, every excess at n questions.
* **Two references; the p-value is the larger of the two** (an intersection test: it holds its
  level wherever either reference is exact):

  - *conditional*: the groups' own fixed-fixed null. Each group (within each stratum) is
    randomised as a whole, keeping its margins, by a curveball chain run from the data and then
    from that draw (Besag & Clifford's parallel scheme), and the statistic of p5s is recomputed
    on every draw. Exact when neither group has structure beyond its margins, whatever their
    sizes, pools and firing frequencies differ; blind to the spread real structure adds (two
    groups with the same rivalry look different to it).
  - *relabel*: the questions' labels permuted (within strata, sizes kept), T recomputed on each
    relabelling by the same randomised procedure as the observed one (new blocks, a fixed-fixed
    null draw per excess). Exact when the labels are exchangeable (the same structure in both
    groups); fooled when the groups differ in their margins, since relabelled groups are mixtures.
* **p-values no finer than their reference**: both are rank p-values, (1 + #{reference <= T}) /
  (n_perm + 1), never below 1 / (n_perm + 1) (``p_resolution``). Their Monte-Carlo error comes
  from the reference's size and the observed statistic's own noise (``replicates`` further
  evaluations of it, with new blocks and null draws). A statistic equal to its reference in most
  draws (every p5 at a tie value, rounding only) carries no information: no p-value, the reason.
* **No claim from tiny groups**: below ``min_group`` questions in either group no calibrated
  p-value is computed, and the result says why.

Every random stream is keyed by (seed, role, index): draw i uses the same stream whatever
``n_perm`` is. Imports numpy/scipy only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import scipy.stats

from qsae.analysis.params import PaperParams

from .correlations import (
    DENSE_FEATURES,
    blocked_pair_percentile,
    constant_columns,
    curveball,
    pair_correlations,
    percentile,
    permute_columns,
    select_features,
)

# Keys of the random streams: np.random.default_rng([seed, ROLE, index]).
_PERMUTATION, _OBSERVED, _DESCRIPTIVE, _CONDITIONAL = 0, 1, 2, 4
# Statistics closer than this are equal (p5s are O(1e-3..1): what is left is rounding).
TIE = 1e-12


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


def null_draw(X: sp.spmatrix, rng: np.random.Generator, params: PaperParams, cells: np.ndarray | None = None
              ) -> sp.csr_matrix:
    """One draw of the null within each cell of rows (label -1: left as it is): fixed-fixed
    (curveball: counts per question and each feature's values kept) or feature-marginal."""
    if params.null == "fixed_fixed":
        return curveball(X, rng, params.rounds, cells)
    X = sp.csr_matrix(X)
    if cells is None:
        return permute_columns(X, rng).tocsr()
    order, parts = [], []
    for c in np.unique(cells):
        rows = np.flatnonzero(cells == c)
        parts.append(X[rows] if c < 0 else permute_columns(X[rows], rng).tocsr())
        order.append(rows)
    stacked = sp.vstack(parts).tocsr()
    return stacked[np.argsort(np.concatenate(order))]


def group_stats(X: sp.csr_matrix, params: PaperParams, rng: np.random.Generator, keep: bool = True,
                n_null: int | None = None) -> GroupStats:
    """p5 of one group's feature correlations and its null (``params.null``; mean of draws)."""
    feats, n_active = select_features(X, params.min_mean, params.max_features, params.feature_seed,
                                      params.min_questions)
    Xs = sp.csc_matrix(X[:, feats]) if feats.size else sp.csc_matrix((X.shape[0], 0))
    n_single = int((np.diff(Xs.indptr) == 1).sum()) if feats.size else 0
    draws = params.n_null if n_null is None else n_null
    if feats.size > DENSE_FEATURES:  # no cap: never F x F; the exact percentile in blocks
        p5, n_pairs, n_const = blocked_pair_percentile(Xs, params.percentile)
        nulls = [blocked_pair_percentile(null_draw(Xs, rng, params), params.percentile)[0] for _ in range(draws if n_pairs else 0)]
        corr = null_corr = np.empty(0)
    else:
        corr, n_const = pair_correlations(Xs) if not keep else _corrcoef_pairs(Xs)
        p5, n_pairs = percentile(corr, params.percentile), int(corr.size)
        nulls, null_corr = [], np.empty(0)
        for _ in range(draws if corr.size else 0):
            null_corr, _ = pair_correlations(null_draw(Xs, rng, params))
            nulls.append(percentile(null_corr, params.percentile))
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


@dataclass
class MWU:
    """The paper's test over all pairs (descriptive: pairs are not independent draws)."""

    U: float | None = None
    p_less: float | None = None
    rank_biserial: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"U": self.U, "p_less": self.p_less, "rank_biserial": self.rank_biserial}
        return {**out, "reason": self.reason} if self.reason else out


def paper_mwu(amb: np.ndarray, unamb: np.ndarray) -> MWU:
    """The paper's test over all pairs: ``mannwhitneyu(amb, unamb, alternative="less")`` on the
    correlations ``np.corrcoef`` gives (``_corrcoef_pairs``): its ties are the paper's."""
    if amb.size == 0 or unamb.size == 0:
        return MWU(reason="an empty group, or more than DENSE_FEATURES features (pairs not held): no test")
    res = scipy.stats.mannwhitneyu(amb, unamb, alternative="less")
    return MWU(float(res.statistic), float(res.pvalue), float(2 * res.statistic / (amb.size * unamb.size) - 1))


# ------------------------------------------------------------- the calibrated test
@dataclass
class Layout:
    """The evaluated sets of one labelling: per stratum the smaller group and disjoint blocks of
    the larger one, each set's weight in T (signed: + ambiguous, - unambiguous) and its group."""

    sets: list[np.ndarray]
    weights: np.ndarray
    groups: list[str]
    stratum: np.ndarray  # index of each set's stratum
    block_size: list[int]  # per stratum

    def statistic(self, values: np.ndarray) -> float:
        return float(np.dot(self.weights, values))

    def per_group(self, values: np.ndarray, stratum_weights: np.ndarray) -> dict[str, float]:
        """Per group, the strata-weighted mean over its sets of ``values``."""
        out = {}
        for g in ("ambiguous", "unambiguous"):
            tot = 0.0
            for s, w in enumerate(stratum_weights):
                m = [i for i, (gg, st) in enumerate(zip(self.groups, self.stratum)) if gg == g and st == s]
                tot += w * float(np.mean(values[m]))
            out[g] = tot
        return out

    def per_stratum(self, values: np.ndarray) -> list[float]:
        n = int(self.stratum.max()) + 1 if self.stratum.size else 0
        out = []
        for s in range(n):
            m = self.stratum == s
            signs = np.sign(self.weights[m])
            a, u = values[m][signs > 0], values[m][signs < 0]
            out.append(float(a.mean() - u.mean()))
        return out


def layout(is_amb: np.ndarray, strata_rows: list[np.ndarray], stratum_weights: np.ndarray,
           rng: np.random.Generator) -> Layout:
    """The smaller group of each stratum against random disjoint blocks of the larger one."""
    sets, weights, groups, stratum, sizes = [], [], [], [], []
    for s, (rows, w) in enumerate(zip(strata_rows, stratum_weights)):
        a, u = rows[is_amb[rows]], rows[~is_amb[rows]]
        amb_small = a.size <= u.size
        small, large = (a, u) if amb_small else (u, a)
        n = small.size
        n_blocks = large.size // n
        blocks = rng.permutation(large)[: n_blocks * n].reshape(n_blocks, n)
        for rows_, g, wt in [(small, "ambiguous" if amb_small else "unambiguous", w)] + [
                (np.sort(b), "unambiguous" if amb_small else "ambiguous", w / n_blocks) for b in blocks]:
            sets.append(np.sort(rows_))
            groups.append(g)
            weights.append(wt if g == "ambiguous" else -wt)
            stratum.append(s)
        sizes.append(n)
    return Layout(sets, np.asarray(weights, float), groups, np.asarray(stratum, np.int64), sizes)


def set_p5(X: sp.csr_matrix, rows: np.ndarray, params: PaperParams) -> float:
    """The paper's p5 on one set of questions (its own mean filter and cap)."""
    Xr = X[rows]
    feats, _ = select_features(Xr, params.min_mean, params.max_features, params.feature_seed, params.min_questions)
    if feats.size < 2:
        return float("nan")
    Xs = Xr.tocsc()[:, feats]
    if feats.size > DENSE_FEATURES:
        return blocked_pair_percentile(Xs, params.percentile)[0]
    return percentile(pair_correlations(Xs)[0], params.percentile)


def _cells(lay: Layout, Q: int, by: Literal["set", "group"]) -> np.ndarray:
    """Row labels for the null's chain: each set on its own, or each group within its stratum
    (rows in no set: -1, never moved)."""
    cells = np.full(Q, -1, np.int64)
    for i, rows in enumerate(lay.sets):
        cells[rows] = i if by == "set" else 2 * lay.stratum[i] + (lay.groups[i] == "ambiguous")
    return cells


def relabel_statistic(X: sp.csr_matrix, is_amb: np.ndarray, strata_rows: list[np.ndarray],
                      stratum_weights: np.ndarray, params: PaperParams, rng: np.random.Generator
                      ) -> tuple[float, Layout, np.ndarray]:
    """T of one labelling as the relabelling reference computes it: new blocks, and each set's
    excess against ``n_null`` null draws of that set alone. Returns (T, layout, excess per set)."""
    lay = layout(is_amb, strata_rows, stratum_weights, rng)
    cells = _cells(lay, X.shape[0], "set")
    obs = np.array([set_p5(X, r, params) for r in lay.sets])
    null = np.zeros(len(lay.sets))
    for _ in range(params.n_null):
        Y = null_draw(X, rng, params, cells)
        null += np.array([set_p5(Y, r, params) for r in lay.sets]) / params.n_null
    ex = obs - null
    return lay.statistic(ex), lay, ex


@dataclass
class Component:
    """One reference of the calibrated test: its rank p-values and what they rest on."""

    name: str
    statistic: float  # the observed statistic this reference ranks
    p_less: float | None = None
    p_greater: float | None = None
    ties: float = 0.0  # share of the reference equal to the observed statistic
    sd: float = 0.0  # spread of the reference
    replicate_p: list[float] = field(default_factory=list)  # p_less of the observed statistic's replicates
    values: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))


def rank_component(name: str, observed: float, reference: np.ndarray, replicates: np.ndarray) -> Component:
    """Rank p-values of ``observed`` against ``reference`` (ties counted against the claim)."""
    ok = reference[np.isfinite(reference)]
    c = Component(name, observed, values=reference)
    if not ok.size or not np.isfinite(observed):
        return c
    n = ok.size
    c.p_less = float((1 + (ok <= observed + TIE).sum()) / (n + 1))
    c.p_greater = float((1 + (ok >= observed - TIE).sum()) / (n + 1))
    c.ties = float((np.abs(ok - observed) <= TIE).mean())
    c.sd = float(ok.std())
    c.replicate_p = [float((1 + (ok <= r + TIE).sum()) / (n + 1)) for r in replicates if np.isfinite(r)]
    return c


@dataclass
class Calibrated:
    """The calibrated test of T = excess_ambiguous - excess_unambiguous at equal group sizes."""

    design: str
    null: str = "fixed_fixed"
    reference: str = "both"
    p_less: float | None = None  # one-sided: ambiguous more rival; the larger of the references' p
    p_greater: float | None = None
    p_two_sided: float | None = None
    p_resolution: float | None = None  # 1 / (n_perm + 1): no p-value is smaller
    p_less_mc_se: float | None = None  # Monte-Carlo error: the reference's size and the statistic's noise
    statistic: float | None = None  # excess_ambiguous - excess_unambiguous (excess against the conditional draws)
    excess: dict[str, float] = field(default_factory=dict)
    p5: dict[str, float] = field(default_factory=dict)
    null_p5: dict[str, float] = field(default_factory=dict)
    block_size: int = 0
    n_perm: int = 0
    replicates: int = 0
    strata: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, Component] = field(default_factory=dict)
    noise_sd: float | None = None  # sd of the relabelling statistic over the observed labelling's replicates
    reason: str | None = None  # why there is no p-value
    degenerate: bool = False  # the statistic carries no information (equal to its reference)

    @property
    def perm_statistics(self) -> np.ndarray:
        c = self.components.get("relabel")
        return c.values if c is not None else np.empty(0)

    def as_dict(self) -> dict[str, Any]:
        out = {"design": self.design, "null": self.null, "reference": self.reference, "p_less": self.p_less,
               "p_less_mc_se": self.p_less_mc_se, "p_resolution": self.p_resolution, "p_greater": self.p_greater,
               "p_two_sided": self.p_two_sided, "statistic": self.statistic, "n_perm": self.n_perm,
               "replicates": self.replicates, "block_size": self.block_size, "noise_sd": self.noise_sd,
               "degenerate": self.degenerate, "strata": self.strata,
               "components": {k: {"statistic": c.statistic, "p_less": c.p_less, "p_greater": c.p_greater,
                                  "ties": c.ties, "reference_sd": c.sd} for k, c in self.components.items()},
               "what": "T = excess_ambiguous - excess_unambiguous at equal group sizes (excess = p5 - its "
                       "null p5; the null keeps each question's count of active features and each feature's "
                       "values); p: the larger of the rank p against the groups' own null and against "
                       "relabellings of the questions: calibrated"}
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


def _map(fn, items: list, n_jobs: int | None) -> np.ndarray:
    jobs = n_jobs or min(4, os.cpu_count() or 1)
    if jobs > 1 and len(items) > 1:
        with ThreadPoolExecutor(jobs) as ex:
            return np.fromiter(ex.map(fn, items), float, len(items))
    return np.fromiter(map(fn, items), float, len(items))


def _tie_reason(X: sp.csr_matrix, lay: Layout, p5s: np.ndarray, comp: Component) -> str:
    at_tie = [bool(np.isclose(v, -1.0 / (rows.size - 1), rtol=0, atol=1e-9)) for v, rows in zip(p5s, lay.sets)]
    why = ("every group's p5 sits at -1/(n-1), the correlation of two features firing in one question each"
           if all(at_tie) else "the statistic does not move")
    return (f"no information: the statistic equals its observed value in {comp.ties:.0%} of the {comp.name} "
            f"reference's draws ({why}): no calibrated p-value")


def calibrated_test(X: sp.csr_matrix, is_ambiguous: np.ndarray, params: PaperParams = PaperParams(),
                    n_perm: int = 1000, seed: int = 0, n_jobs: int | None = None,
                    strata: np.ndarray | None = None) -> Calibrated:
    """The calibrated test on pooled rows (see the module docstring). ``strata``: one label
    per row (e.g. the relation type); the null and the relabellings then act within strata."""
    is_amb = np.asarray(is_ambiguous, bool)
    X = sp.csr_matrix(X)
    design = (f"equal-size blocks; {params.null.replace('_', '-')} null; reference: {params.reference}"
              + (" (the larger p of the conditional and the relabelling one)" if params.reference == "both" else "")
              + ("; within strata" if strata is not None else ""))
    base = Calibrated(design, params.null, params.reference)
    na, nu = int(is_amb.sum()), int((~is_amb).sum())
    if n_perm == 0:
        base.reason = "n_perm = 0: the calibrated test was not run"
        return base
    if min(na, nu) < params.min_group:
        base.reason = (f"the {'ambiguous' if na < nu else 'unambiguous'} group has {min(na, nu)} questions "
                       f"(< min_group = {params.min_group}): no calibrated p-value")
        return base
    rows, weights, table = _strata_rows(is_amb, strata, params)
    base.strata = table if strata is not None else []
    if not rows:
        base.reason = f"no stratum holds >= {params.min_stratum} questions of each group: no calibrated p-value"
        return base
    w = weights / weights.sum()
    # Columns that can pass the mean filter in some evaluated set (each has its stratum's block
    # size n): their positive values must sum above min_mean * n. Ids stay in order, so the cap's
    # choice is the one made on the full matrix.
    X = X[:, candidate_columns(X, int(weights.min()), params.min_mean)].tocsr()

    # The observed labelling: its layout (replicate 0) and further replicates of the relabelling statistic.
    reps = [relabel_statistic(X, is_amb, rows, w, params, np.random.default_rng([seed, _OBSERVED, r]))
            for r in range(1 + max(0, params.replicates))]
    T_rel = np.array([t for t, _, _ in reps])
    lay = reps[0][1]
    p5_obs = np.array([set_p5(X, r, params) for r in lay.sets])
    cond_obs = lay.statistic(p5_obs)
    cond_reps = np.array([r[1].statistic(np.array([set_p5(X, s, params) for s in r[1].sets])) for r in reps[1:]])

    comps: dict[str, Component] = {}
    cond_draws = np.empty((0, len(lay.sets)))
    if params.reference in ("both", "conditional"):
        cells = _cells(lay, X.shape[0], "group")
        hub = null_draw(X, np.random.default_rng([seed, _CONDITIONAL]), params, cells)  # the chain run back once

        def draw(i: int) -> np.ndarray:
            Y = null_draw(hub, np.random.default_rng([seed, _CONDITIONAL, i]), params, cells)
            return np.array([set_p5(Y, r, params) for r in lay.sets])

        jobs = n_jobs or min(4, os.cpu_count() or 1)
        if jobs > 1 and n_perm > 1:
            with ThreadPoolExecutor(jobs) as ex:
                cond_draws = np.array(list(ex.map(draw, range(n_perm))))
        else:
            cond_draws = np.array([draw(i) for i in range(n_perm)])
        comps["conditional"] = rank_component("conditional", cond_obs, cond_draws @ lay.weights, cond_reps)
    if params.reference in ("both", "relabel"):
        def one(i: int) -> float:
            r = np.random.default_rng([seed, _PERMUTATION, i])
            lab = is_amb.copy()
            for rs in rows:
                lab[rs] = r.permutation(lab[rs])
            return relabel_statistic(X, lab, rows, w, params, r)[0]

        comps["relabel"] = rank_component("relabel", float(T_rel[0]), _map(one, list(range(n_perm)), n_jobs), T_rel[1:])

    out = base
    out.components, out.n_perm, out.replicates = comps, n_perm, len(reps) - 1
    out.block_size = int(lay.block_size[0]) if strata is None else int(weights.sum())
    out.p_resolution = 1.0 / (n_perm + 1)
    out.noise_sd = float(T_rel.std(ddof=1)) if T_rel.size > 1 else None
    if cond_draws.size:  # excess against the conditional draws: the precise null mean of every set
        null_sets = np.nanmean(cond_draws, axis=0)
    else:
        null_sets = p5_obs - reps[0][2]
    out.p5, out.null_p5 = lay.per_group(p5_obs, w), lay.per_group(null_sets, w)
    out.excess = {g: out.p5[g] - out.null_p5[g] for g in out.p5}
    out.statistic = lay.statistic(p5_obs - null_sets)
    for t, stratum in zip(lay.per_stratum(p5_obs - null_sets), [s for s in out.strata if s["used"]]):
        stratum["statistic"] = t
    flat = [c for c in comps.values() if c.ties >= 0.5 or (c.p_less is not None and c.sd <= TIE)]
    if flat:
        out.degenerate = True
        out.reason = _tie_reason(X, lay, p5_obs, flat[0])
        return out
    if any(c.p_less is None for c in comps.values()):
        out.reason = "the statistic is undefined (a group without two features to correlate): no calibrated p-value"
        return out
    out.p_less = max(c.p_less for c in comps.values())
    out.p_greater = max(c.p_greater for c in comps.values())
    out.p_two_sided = float(min(1.0, 2 * min(out.p_less, out.p_greater)))
    # Monte-Carlo error: the reference's size (binomial) and the observed statistic's own noise
    # (the p-values of its replicates, each with new blocks and null draws).
    rep_p = [max(ps) for ps in zip(*(c.replicate_p for c in comps.values()))]
    noise = float(np.var(rep_p, ddof=1)) if len(rep_p) > 1 else 0.0
    out.p_less_mc_se = float(np.sqrt(out.p_less * (1 - out.p_less) / (n_perm + 1) + noise))
    return out


@dataclass
class RivalryTest:
    """The paper's per-group statistics and MWU (descriptive), and the calibrated test(s)."""

    ambiguous: GroupStats
    unambiguous: GroupStats
    paper: MWU
    calibrated: Calibrated
    pooled: Calibrated | None = None  # with strata: the same test ignoring them, beside it

    def as_dict(self, pct: float) -> dict[str, Any]:
        out = {"ambiguous": self.ambiguous.as_dict(pct), "unambiguous": self.unambiguous.as_dict(pct),
               "calibrated": self.calibrated.as_dict(),
               "paper": {**self.paper.to_dict(), "what": "mannwhitneyu(pairs_ambiguous, pairs_unambiguous, 'less') "
                                                         "as in the paper: feature pairs are not independent draws, "
                                                         "NOT calibrated"}}
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
