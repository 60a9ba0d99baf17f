"""One layer of the rivalry study: what each protocol reads and computes, as typed results that
hold the analyses' own typed tests (dicts only in ``to_dict``, the JSON edge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from qsae.analysis.rivalry import (
    AMBIGUOUS,
    UNAMBIGUOUS,
    Calibrated,
    GroupComparison,
    PairedAUROC,
    RivalryTest,
    StratifiedTest,
    codes_matrix,
    compare_groups,
    decoder_cosine_score,
    paired_auroc,
    rivalry_test,
    roc_curve,
    score_questions,
    stratified_permutation_test,
)

from .plan import CODES, CORRECT_LABEL, NULL_NAMES, PREDICTORS, SCORE, RivalryPlan


@dataclass
class Correctness:
    """The paper's experiment 3 at one layer: the per-prompt score's AUROC for `correct` beside
    two baselines on one set of bootstrap resamples, or why it was skipped."""

    skipped: str | None = None
    n_correct: int = 0
    n: int = 0
    predictors: dict[str, str] = field(default_factory=dict)
    paired: PairedAUROC | None = None
    cautions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        return {"label": CORRECT_LABEL, "n_correct": self.n_correct, "n": self.n, "predictors": self.predictors,
                **(self.paired.to_dict() if self.paired else {}), "cautions": self.cautions}


@dataclass
class LayerResult:
    """One layer of one protocol: its headline ``test`` (Holm's adjustment beside it), the
    cautions, the per-question columns of its result group, the figures' data."""

    layer: int
    cautions: list[str] = field(default_factory=list)
    per_question: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    dists: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)
    p_less_holm: float | None = None
    correctness: Correctness | None = None
    protocol: ClassVar[str] = ""

    @property
    def test(self) -> Calibrated | StratifiedTest:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class PaperLayer(LayerResult):
    """The paper's statistics (descriptive) and the calibrated test at one layer."""

    rivalry: RivalryTest | None = None
    percentile: float = 5.0
    p5_note: str = ""
    strata_variable: str | None = None
    protocol: ClassVar[str] = "paper"

    @property
    def test(self) -> Calibrated:
        return self.rivalry.calibrated

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, **self.rivalry.as_dict(self.percentile)}
        out["calibrated"]["p_less_holm"] = self.p_less_holm
        if self.strata_variable:
            out["calibrated"]["strata_variable"] = self.strata_variable
        out["p5_note"] = self.p5_note
        if self.correctness is not None:
            out["correctness"] = self.correctness.to_dict()
        out["cautions"] = self.cautions
        return out


@dataclass
class PerQuestionLayer(LayerResult):
    """Per-question scores over distinct completions, compared within strata of D (descriptive)."""

    stratified: StratifiedTest | None = None
    descriptive: GroupComparison | None = None
    constant_features_left_out: int = 0
    questions_without_score: int = 0
    protocol: ClassVar[str] = "per_question"

    @property
    def test(self) -> StratifiedTest:
        return self.stratified

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer,
                "stratified_by_D": {**self.stratified.to_dict(), "p_less_holm": self.p_less_holm, "what": (
                    "labels permuted within strata of D (distinct completions): DESCRIPTIVE, NOT calibrated: "
                    "answer-type features shared by one group's completions at fixed D move it without any rivalry")},
                "descriptive": {**self.descriptive.to_dict(),
                                "what": "unconditional Mann-Whitney U: confounded by D, descriptive only"},
                "constant_features_left_out": self.constant_features_left_out,
                "questions_without_score": self.questions_without_score, "cautions": self.cautions}


# ------------------------------------------------------------------- computing one layer
def _decoder(plan: RivalryPlan, layer: int) -> tuple[np.ndarray | None, str | None]:
    """Unit-norm decoder rows of the SAE that made this layer's codes, or why not."""
    source = plan.attrs.get("sae_source")
    try:
        from qsae.jobs.codes import load_sae_for  # torch, lazily: only for the per-prompt score

        sae = load_sae_for(plan.attrs, layer)  # the file that made the codes, checked like everywhere
    except Exception as e:  # noqa: BLE001 - any reason the SAE is unusable here is reported, not fatal
        return None, f"SAE {source!r} not usable here ({type(e).__name__}: {e})"
    W = sae.W_dec.detach().double().numpy()
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12), None


def correctness(plan: RivalryPlan, layer: int, idx: np.ndarray, val: np.ndarray
                ) -> tuple[Correctness, dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The paper's per-prompt score and its AUROC for `correct` beside two baselines, all on one
    set of bootstrap resamples (paired), with a CI for each difference."""
    cfg = plan.cfg
    W, why = _decoder(plan, layer)
    if W is None:
        return Correctness(skipped=why), {}, {}
    pct = cfg.paper.percentile
    score = decoder_cosine_score(idx, val, W, top=50, pct=pct)
    keep = np.isfinite(plan.entropy)  # done questions
    y = plan.correct[keep]
    predictors = {SCORE: -score, **plan.baselines}
    out = Correctness(n_correct=int(y.sum()), n=int(y.size), predictors={k: PREDICTORS[k] for k in predictors},
                      paired=paired_auroc(y, {k: s[keep] for k, s in predictors.items()}, cfg.n_boot, cfg.seed))
    if min(int(y.sum()), int((~y).sum())) < 10:
        out.cautions.append(f"only {int(y.sum())} correct and {int((~y).sum())} incorrect questions: the AUROCs and "
                            "their CIs say little")
    n_feat = np.minimum((val[keep] > 0.01).sum(axis=1), 50)
    if n_feat.size and (n_feat.min() < 0.5 * n_feat.max() or n_feat.min() < 5):
        out.cautions.append(
            f"the score's p{pct:g} runs over the decoder cosines of {n_feat.min()} to {n_feat.max()} active features "
            "per prompt (not a fixed count, as TopK's k would give): a prompt's score moves with how many features it "
            "has, and correctness may follow that count rather than rivalry")
    rocs = {name: roc_curve(y, s[keep]) for name, s in predictors.items()}
    return out, {"prompt_score": score}, rocs


class Protocol:
    """What one protocol reads and computes per layer, and the by-layer columns it adds."""

    name = ""
    codes: tuple[str, str] = ("", "")
    effect_label = ""

    def layer(self, plan: RivalryPlan, layer: int, ds: xr.Dataset) -> LayerResult:
        raise NotImplementedError

    def by_layer(self, plan: RivalryPlan, results: list[LayerResult], out: xr.Dataset) -> None:
        raise NotImplementedError


def _nan(x: float | None) -> float:
    return np.nan if x is None else float(x)


class PaperProtocol(Protocol):
    """Correlations across a group's questions at the prompt's end (the paper), calibrated test."""

    name = "paper"
    codes = CODES["paper"]
    effect_label = "T = excess amb - excess unamb (equal sizes)"

    def layer(self, plan: RivalryPlan, layer: int, ds: xr.Dataset) -> PaperLayer:
        cfg = plan.cfg
        labels = plan.grouping.labels
        codes = ds[list(self.codes)].sel(layer=layer).load()
        idx, val = codes[self.codes[0]].values, codes[self.codes[1]].values
        pooled = np.flatnonzero((labels == AMBIGUOUS) | (labels == UNAMBIGUOUS))
        X = codes_matrix(idx[pooled], val[pooled], int(plan.attrs["d_sae"]))
        strata = plan.strata[pooled] if plan.strata is not None else None
        res = rivalry_test(X, labels[pooled] == AMBIGUOUS, cfg.paper, cfg.n_perm, cfg.seed, cfg.n_jobs, strata)
        pct = cfg.paper.percentile
        note = (f"p{pct:g} of pairwise Pearson correlations across each whole group's questions (the paper's numbers, "
                "descriptive); null: " + NULL_NAMES[cfg.paper.null])
        if cfg.paper.max_features is None:
            note += "; no feature cap: exact percentile computed in bounded memory"
        out = PaperLayer(layer, rivalry=res, percentile=pct, p5_note=note, strata_variable=plan.strata_name,
                         dists={AMBIGUOUS: res.ambiguous.correlations, UNAMBIGUOUS: res.unambiguous.correlations,
                                "null " + AMBIGUOUS: res.ambiguous.null_correlations,
                                "null " + UNAMBIGUOUS: res.unambiguous.null_correlations})
        if cfg.correctness:
            out.correctness, out.per_question, out.roc = correctness(plan, layer, idx, val)
        out.cautions = self.cautions(out)
        return out

    @staticmethod
    def cautions(r: PaperLayer) -> list[str]:
        """What a reader must know before quoting this layer's numbers."""
        out = [f"layer {r.layer}: {r.test.reason}"] if r.test.reason else []
        for g, st in ((AMBIGUOUS, r.rivalry.ambiguous), (UNAMBIGUOUS, r.rivalry.unambiguous)):
            if st.n_features and st.n_single >= 0.2 * st.n_features:
                out.append(f"layer {r.layer}: {st.n_single} of the {st.n_features} features used in the {g} group "
                           "pass the mean filter on a single activation (their correlations are ties at -1/(Q-1)): "
                           f"the paper's p{r.percentile:g} and MWU lean on them")
        out += [f"layer {r.layer}: AUROC: {c}" for c in (r.correctness.cautions if r.correctness else [])]
        return out

    def by_layer(self, plan: RivalryPlan, results: list[PaperLayer], out: xr.Dataset) -> None:
        tag = f"p{plan.cfg.paper.percentile:g}"

        def col(get) -> tuple[str, np.ndarray]:
            return "layer", np.array([_nan(get(r)) for r in results])

        out["p_calibrated_mc_se"] = col(lambda r: r.test.p_less_mc_se)
        out["p_calibrated_resolution"] = col(lambda r: r.test.p_resolution)
        for ref in ("conditional", "relabel"):
            out[f"p_{ref}"] = col(lambda r, ref=ref: getattr(r.test.components.get(ref), "p_less", None))
        out["p_paper_mwu"] = col(lambda r: r.rivalry.paper.p_less)
        out["statistic"] = col(lambda r: r.test.statistic)
        if any(r.rivalry.pooled is not None for r in results):
            out["p_calibrated_pooled"] = col(lambda r: r.rivalry.pooled.p_less if r.rivalry.pooled else None)
        for g in (AMBIGUOUS, UNAMBIGUOUS):
            out[f"{tag}_{g}"] = col(lambda r, g=g: getattr(r.rivalry, g).p5)
            out[f"null_{tag}_{g}"] = col(lambda r, g=g: getattr(r.rivalry, g).null_p5)
            out[f"excess_{g}"] = col(lambda r, g=g: r.test.excess.get(g))


class PerQuestionProtocol(Protocol):
    """One score per question over its distinct completions; compared within strata of D."""

    name = "per_question"
    codes = CODES["per_question"]
    effect_label = "D-stratified mean score difference"

    def layer(self, plan: RivalryPlan, layer: int, ds: xr.Dataset) -> PerQuestionLayer:
        cfg = plan.cfg
        labels = plan.grouping.labels
        n = ds.sizes["question"]
        cols: dict[str, list[np.ndarray]] = {}
        fixed = True  # every completion's code has exactly k active features (TopK)
        for start in range(0, n, cfg.block_questions):
            block = slice(start, min(start + cfg.block_questions, n))
            sel = ds[list(self.codes)].sel(layer=layer).isel(question=block).load()
            vals = sel[self.codes[1]].values
            scored = score_questions(sel[self.codes[0]].values, vals, cfg.paper.percentile, plan.first_copy[block])
            for key, value in scored.items():
                cols.setdefault(key, []).append(value)
            done = np.isfinite(plan.entropy[block])
            active = np.count_nonzero(vals[done], axis=-1)
            fixed &= bool(active.size == 0 or (active == vals.shape[-1]).all())
        per_q = {key: np.concatenate(parts) for key, parts in cols.items()}
        score = np.where(np.isfinite(plan.entropy), per_q["score"], np.nan)
        per_q["score"] = score
        grouped = (labels == AMBIGUOUS) | (labels == UNAMBIGUOUS)
        out = PerQuestionLayer(
            layer, per_question=per_q,
            dists={g: score[(labels == g) & np.isfinite(score)] for g in (AMBIGUOUS, UNAMBIGUOUS)},
            stratified=stratified_permutation_test(np.where(grouped, score, np.nan), labels == AMBIGUOUS,
                                                   plan.distinct, cfg.n_perm, cfg.seed),
            descriptive=compare_groups(score[labels == AMBIGUOUS], score[labels == UNAMBIGUOUS], cfg.n_boot, cfg.seed),
            constant_features_left_out=int(per_q["n_constant"][grouped].sum()),
            questions_without_score=int((grouped & ~np.isfinite(score)).sum()))
        out.cautions = [f"layer {layer}: per_question p-values are descriptive (no calibrated null: shared "
                        "answer-type features at fixed D move them); use the paper protocol's calibrated test for "
                        "inference"]
        if fixed:
            out.cautions.append(
                f"layer {layer}: every completion codes exactly k = {plan.k} features (TopK): within a question the "
                "features of its few distinct completions compete for those k slots, which pulls the per-question "
                "p5 down with no rivalry, more so where they come from a small set; this score does not condition "
                "on the fixed count (the paper protocol's calibrated test does)")
        return out

    def by_layer(self, plan: RivalryPlan, results: list[PerQuestionLayer], out: xr.Dataset) -> None:
        out["statistic"] = ("layer", np.array([_nan(r.test.statistic) for r in results]))


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PaperProtocol(), PerQuestionProtocol())}
