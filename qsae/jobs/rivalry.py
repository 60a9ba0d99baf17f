"""The rivalry study on a question lake, every captured layer, results written into the store.

Stages, as a flow composes them: ``plan_rivalry`` (open the lake once, entropy, groups,
strata, distinct completions, correctness: everything that does not depend on the layer) ->
``rivalry_layer`` per layer (reads only that layer's codes; a mapped task) ->
``finish_rivalry`` (Holm across layers, result groups, figures). ``run_rivalry`` strings them
in-process for a notebook. What differs between the two protocols lives in one object each
(``PROTOCOLS``): the codes read, the layer's statistics, the by-layer columns and the rendering.
Definitions: ``qsae.analysis.rivalry``.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from qsae.analysis.rivalry import (
    AMBIGUOUS,
    NOT_CAPTURED,
    UNAMBIGUOUS,
    Grouping,
    codes_matrix,
    compare_groups,
    decoder_cosine_score,
    distinct_rows,
    entropy_groups,
    first_word_entropy,
    holm,
    paired_auroc,
    rivalry_test,
    roc_curve,
    score_questions,
    stratified_permutation_test,
)
from qsae.errors import LayerError, SchemaError
from qsae.jobs import interrupt
from qsae.jobs.configs import RivalryConfig
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report
from qsae.lake.results import LakeState, figure_png, lineage_of, save_png, write_result_group
from qsae.lake.store import open_lake

log = logging.getLogger("qsae.jobs.rivalry")

SCORE, MAX_PROB, NEG_ENTROPY = "rivalry_score", "max_first_token_prob", "neg_exact_entropy"
# What each predictor of correctness is, for the tables, legends and the summary (keys are identifiers).
PREDICTORS = {SCORE: "rivalry score (-decoder-cosine p5)", MAX_PROB: "first-token max probability",
              NEG_ENTROPY: "-exact first-token entropy (nats)"}
CORRECT_LABEL = "correct: at least half of the question's samples contain a gold answer"
NULL_NAMES = {"fixed_fixed": "each question's count of active features and each feature's values kept, "
                             "co-activation otherwise random (curveball)",
              "feature_marginal": "each feature's values moved to random questions of the group (counts per "
                                  "question not kept: TopK's fixed k reads as rivalry)"}
ENTROPY_NAMES = {"first_word": "first-word entropy / log S (0..1)", "exact": "exact first-token entropy (nats)",
                 "sampled": "sampled first-token entropy (nats)"}


@dataclass
class RivalryPlan:
    """What every layer shares: the question table, the groups, the strata and the lineage."""

    cfg: RivalryConfig
    layers: list[int]
    questions: np.ndarray
    entropy: np.ndarray
    grouping: Grouping
    distinct: np.ndarray  # D: distinct completions per question
    first_copy: np.ndarray = field(repr=False)  # (Q, S): the first sample of each distinct completion
    correct: np.ndarray | None = None  # per question: at least half of the samples correct
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 0
    k: int = 0
    strata_name: str | None = None  # the question variable the calibrated test stratifies by
    strata: np.ndarray | None = None
    state: LakeState | None = None  # the lake as the plan read it: recorded in every result group

    @property
    def protocol(self) -> Protocol:
        return PROTOCOLS[self.cfg.protocol]

    def groups_summary(self) -> dict[str, Any]:
        out = self.grouping.summary(self.entropy)
        if self.state is not None:
            out["captured"] = {"n_done": self.state.n_done, "n_questions": self.state.n_units,
                               "note": self.state.line() or "every question captured"}
        out["entropy"] = self.cfg.entropy
        out["entropy_meaning"] = ENTROPY_NAMES[self.cfg.entropy]
        if self.strata is not None:
            out["strata"] = self.strata_name
            out["composition"] = composition(self.strata, self.grouping.labels)
        return out


@dataclass
class LayerResult:
    layer: int
    summary: dict[str, Any]
    per_question: dict[str, np.ndarray]
    dists: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)


@dataclass
class RivalryResult(Report):
    """The study's result: the summary (JSON), the by-layer table, each layer, the figures."""

    group: str
    summary: dict[str, Any]
    by_layer: xr.Dataset
    layers: dict[int, LayerResult]
    figures: dict[str, str]
    images: dict[str, bytes] = field(repr=False, default_factory=dict)
    store: str = ""

    @property
    def figure(self) -> str | None:
        return self.figures.get("by_layer")

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "group": self.group, "figures": self.figures, **self.summary}

    def to_text(self, store: str | None = None) -> str:
        return render_text(self.summary, self.group, self.figures, store or self.store)

    def to_markdown(self, store: str | None = None) -> str:
        return render_markdown(self.summary, self.group, self.figures, self.images, store or self.store)


def composition(strata: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, int]]:
    """Questions per stratum in each group (left-out questions not counted)."""
    out: dict[str, dict[str, int]] = {}
    for s in np.unique(strata):
        m = strata == s
        out[str(s)] = {g: int((m & (labels == g)).sum()) for g in (AMBIGUOUS, UNAMBIGUOUS)}
    return out


def result_group(cfg: RivalryConfig, layer: int | None = None) -> str:
    return f"rivalry/{cfg.protocol}" if layer is None else f"rivalry/layer_{layer}/{cfg.protocol}"


def resolve_layers(ds: xr.Dataset, layers: list[int] | None) -> list[int]:
    captured = [int(x) for x in ds.layer.values]
    if layers is None:
        return captured
    missing = [x for x in layers if x not in captured]
    if missing:
        raise LayerError(f"layers {missing} are not in the lake (layers {captured})")
    return list(layers)


def question_entropy(ds: xr.Dataset, kind: str) -> np.ndarray:
    if kind == "first_word":
        return first_word_entropy(ds.completion.values)
    return (ds.entropy if kind == "exact" else ds.sample_entropy).values.astype(float)


def resolve_strata(ds: xr.Dataset, strata: str) -> tuple[str | None, np.ndarray | None]:
    """The question variable to stratify by: ``auto`` takes ``relation`` when the lake has more
    than one relation type, ``none`` none; any other name must be a question variable."""
    if strata == "none":
        return None, None
    name = "relation" if strata == "auto" else strata
    if name not in ds or ds[name].dims != ("question",):
        if strata == "auto":
            return None, None
        have = sorted(v for v in ds.data_vars if ds[v].dims == ("question",))
        raise SchemaError(f"--strata {strata}: the lake has no question variable {strata!r} (it has {have})")
    values = np.array([str(v) for v in np.asarray(ds[name].values).ravel()], dtype=object)
    if strata == "auto" and len(set(values) - {""}) < 2:
        return None, None
    return name, values


def plan_rivalry(cfg: RivalryConfig) -> RivalryPlan:
    """Open the lake, check it holds codes, compute the layer-independent question table."""
    ds = open_lake(cfg.ref)
    need = PROTOCOLS[cfg.protocol].codes[0]
    if need not in ds:
        raise SchemaError(f"{cfg.store} holds no SAE codes ({need}): capture with an SAE first")
    layers = resolve_layers(ds, cfg.layers)
    done = ds.done.values.astype(bool)
    state = LakeState.of(dict(ds.attrs), done).require(cfg.store, "analyse")
    entropy = np.where(done, question_entropy(ds, cfg.entropy), np.nan)
    grouping = entropy_groups(entropy, cfg.rule, cfg.q, cfg.threshold, cfg.high, cfg.low)
    grouping.labels[~done] = NOT_CAPTURED  # not a group of the analysis: not in it at all
    D, first = distinct_rows(ds.completion_ids.values)
    correct = ds.correct.values.mean(axis=1) >= 0.5
    with np.errstate(over="ignore"):
        max_prob = np.exp(ds.first_logprob.values.astype(float)).max(axis=1)
    baselines = {MAX_PROB: max_prob, NEG_ENTROPY: -ds.entropy.values.astype(float)}
    strata_name, strata = resolve_strata(ds, cfg.strata)
    return RivalryPlan(cfg, layers, ds.question.values, entropy, grouping, np.where(done, D, 0), first,
                       np.where(done, correct, False), baselines, dict(ds.attrs), int(ds.sizes["sample"]),
                       int(ds.sizes["k"]), strata_name, strata, state)


def _decoder(plan: RivalryPlan, layer: int) -> tuple[np.ndarray | None, str | None]:
    """Unit-norm decoder rows of the SAE that made this layer's codes, or why not."""
    source = plan.attrs.get("sae_source")
    try:
        from qsae.sae.formats import load_sae_for  # torch, lazily: only for the per-prompt score

        sae = load_sae_for(plan.attrs, layer)  # the file that made the codes, checked like everywhere
    except Exception as e:  # noqa: BLE001 - any reason the SAE is unusable here is reported, not fatal
        return None, f"SAE {source!r} not usable here ({type(e).__name__}: {e})"
    W = sae.W_dec.detach().double().numpy()
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12), None


def _correctness(plan: RivalryPlan, layer: int, idx: np.ndarray, val: np.ndarray) -> tuple[dict, dict, dict]:
    """The paper's per-prompt score and its AUROC for `correct` beside two baselines, all on one
    set of bootstrap resamples (paired), with a CI for each difference."""
    cfg = plan.cfg
    W, why = _decoder(plan, layer)
    if W is None:
        return {"skipped": why}, {}, {}
    score = decoder_cosine_score(idx, val, W, top=50, pct=cfg.percentile)
    keep = np.isfinite(plan.entropy)  # done questions
    y = plan.correct[keep]
    predictors = {SCORE: -score, **plan.baselines}
    out: dict[str, Any] = {"label": CORRECT_LABEL, "n_correct": int(y.sum()), "n": int(y.size),
                           "predictors": {k: PREDICTORS[k] for k in predictors}}
    out.update(paired_auroc(y, {k: s[keep] for k, s in predictors.items()}, cfg.n_boot, cfg.seed))
    if min(int(y.sum()), int((~y).sum())) < 10:
        out["caution"] = (f"only {int(y.sum())} correct and {int((~y).sum())} incorrect questions: "
                          "the AUROCs and their CIs say little")
    n_feat = np.minimum((val[keep] > 0.01).sum(axis=1), 50)
    if n_feat.size and (n_feat.min() < 0.5 * n_feat.max() or n_feat.min() < 5):
        out.setdefault("cautions", []).append(
            f"the score's p{cfg.percentile:g} runs over the decoder cosines of {n_feat.min()} to {n_feat.max()} active "
            "features per prompt (not a fixed count, as TopK's k would give): a prompt's score moves with how many "
            "features it has, and correctness may follow that count rather than rivalry")
    rocs = {name: roc_curve(y, s[keep]) for name, s in predictors.items()}
    return out, {"prompt_score": score}, rocs


def layer_cautions(plan: RivalryPlan, summary: dict[str, Any]) -> list[str]:
    """What a reader must know before quoting this layer's numbers."""
    out = []
    cal = summary.get("calibrated") or {}
    if cal.get("reason"):
        out.append(f"layer {summary['layer']}: {cal['reason']}")
    for g in (AMBIGUOUS, UNAMBIGUOUS):
        st = summary.get(g) or {}
        if st.get("n_features") and st.get("n_single_activation", 0) >= 0.2 * st["n_features"]:
            out.append(f"layer {summary['layer']}: {st['n_single_activation']} of the {st['n_features']} features "
                       f"used in the {g} group pass the mean filter on a single activation (their correlations are "
                       f"ties at -1/(Q-1)): the paper's p{plan.cfg.percentile:g} and MWU lean on them")
    corr = summary.get("correctness") or {}
    for c in ([corr["caution"]] if corr.get("caution") else []) + corr.get("cautions", []):
        out.append(f"layer {summary['layer']}: AUROC: {c}")
    return out


class Protocol:
    """What one protocol reads, computes per layer, adds to the by-layer table and shows."""

    name = ""
    codes: tuple[str, str] = ("", "")
    p_key = "calibrated"  # the summary entry whose p_less is corrected with Holm across layers
    effect_label = ""

    def layer(self, plan: RivalryPlan, layer: int, ds: xr.Dataset) -> LayerResult:
        raise NotImplementedError

    def by_layer(self, plan: RivalryPlan, results: list[LayerResult], out: xr.Dataset) -> None:
        raise NotImplementedError

    def text_rows(self, s: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def markdown_rows(self, s: dict[str, Any]) -> list[str]:
        raise NotImplementedError


def _f(x: Any, digits: int = 3) -> str:
    """A number as a reader wants it: 3 significant digits, n/a for missing."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{digits}g}"


def _p(c: dict[str, Any]) -> str:
    """A p-value as it may be quoted: with its Monte-Carlo error, never finer than its reference."""
    if c.get("p_less") is None:
        return "n/a (no information)" if c.get("degenerate") else "n/a"
    p, res, se = c["p_less"], c.get("p_resolution"), c.get("p_less_mc_se")
    if res is not None and p <= res * (1 + 1e-9):
        return f"<= {_f(res)} (the finest {c.get('n_perm', 0):,} draws resolve)"
    return f"{_f(p)}" + (f" ± {_f(se, 2)}" if se is not None else "")


class PaperProtocol(Protocol):
    """Correlations across a group's questions at the prompt's end (the paper), calibrated test."""

    name = "paper"
    codes = ("prompt_codes_idx", "prompt_codes_val")
    effect_label = "T = excess amb - excess unamb (equal sizes)"

    def layer(self, plan: RivalryPlan, layer: int, ds: xr.Dataset) -> LayerResult:
        cfg = plan.cfg
        labels = plan.grouping.labels
        codes = ds[list(self.codes)].sel(layer=layer).load()
        idx, val = codes[self.codes[0]].values, codes[self.codes[1]].values
        pooled = np.flatnonzero((labels == AMBIGUOUS) | (labels == UNAMBIGUOUS))
        X = codes_matrix(idx[pooled], val[pooled], int(plan.attrs["d_sae"]))
        strata = plan.strata[pooled] if plan.strata is not None else None
        res = rivalry_test(X, labels[pooled] == AMBIGUOUS, cfg.paper_params(), cfg.n_perm, cfg.seed, cfg.n_jobs,
                           strata)
        summary: dict[str, Any] = {"layer": layer, **res.as_dict(cfg.percentile)}
        if plan.strata_name:
            summary["calibrated"]["strata_variable"] = plan.strata_name
        summary["p5_note"] = (f"p{cfg.percentile:g} of pairwise Pearson correlations across each whole group's "
                              "questions (the paper's numbers, descriptive); null: " + NULL_NAMES[cfg.null])
        if cfg.max_features is None:
            summary["p5_note"] += "; no feature cap: exact percentile computed in bounded memory"
        dists = {AMBIGUOUS: res.ambiguous.correlations, UNAMBIGUOUS: res.unambiguous.correlations,
                 "null " + AMBIGUOUS: res.ambiguous.null_correlations,
                 "null " + UNAMBIGUOUS: res.unambiguous.null_correlations}
        per_q, rocs = {}, {}
        if cfg.correctness:
            summary["correctness"], per_q, rocs = _correctness(plan, layer, idx, val)
        summary["cautions"] = layer_cautions(plan, summary)
        return LayerResult(layer, summary, per_q, dists, rocs)

    def by_layer(self, plan: RivalryPlan, results: list[LayerResult], out: xr.Dataset) -> None:
        tag = f"p{plan.cfg.percentile:g}"
        out["p_calibrated_mc_se"] = ("layer", _col(results, "calibrated", "p_less_mc_se"))
        out["p_calibrated_resolution"] = ("layer", _col(results, "calibrated", "p_resolution"))
        for ref in ("conditional", "relabel"):
            out[f"p_{ref}"] = ("layer", np.array([np.nan if (((r.summary.get("calibrated") or {}).get("components")
                                                                or {}).get(ref) or {}).get("p_less") is None
                                                  else r.summary["calibrated"]["components"][ref]["p_less"]
                                                  for r in results]))
        out["p_paper_mwu"] = ("layer", _col(results, "paper", "p_less"))
        out["statistic"] = ("layer", _col(results, "calibrated", "statistic"))
        if any("calibrated_pooled" in r.summary for r in results):
            out["p_calibrated_pooled"] = ("layer", _col(results, "calibrated_pooled", "p_less"))
        for g in (AMBIGUOUS, UNAMBIGUOUS):
            out[f"{tag}_{g}"] = ("layer", np.array([r.summary[g][tag] for r in results]))
            out[f"null_{tag}_{g}"] = ("layer", np.array([r.summary[g][f"null_{tag}"] for r in results]))
            out[f"excess_{g}"] = ("layer", _col(results, "calibrated", f"excess_{g}"))

    def text_rows(self, s: dict[str, Any]) -> list[str]:
        rows = []
        for layer, r in s["by_layer"].items():
            c = r["calibrated"]
            line = (f"layer {layer}: calibrated p = {_p(c)} (Holm {_f(c.get('p_less_holm'))}), "
                    f"T = {_f(c.get('statistic'))}; paper MWU p = {_f(r['paper'].get('p_less'))} (not calibrated)")
            if "calibrated_pooled" in r:
                line += f"; ignoring {c.get('strata_variable', 'strata')}: p = {_p(r['calibrated_pooled'])}"
            rows.append(line)
            corr = r.get("correctness") or {}
            if corr.get("auroc"):
                rows.append(f"  AUROC for correct ({corr['n_correct']} of {corr['n']}): " + ", ".join(
                    f"{PREDICTORS.get(k, k)} {_f(v)} {_ci(corr['ci'].get(k))}" for k, v in corr["auroc"].items()))
                for k, d in corr.get("difference", {}).items():
                    rows.append(f"    rivalry score - {PREDICTORS.get(k, k)}: {_f(d['value'])} {_ci(d['ci'])}")
        return rows

    def markdown_rows(self, s: dict[str, Any]) -> list[str]:
        p = f"p{s['params']['percentile']:g}"
        lines = [f"| layer | {p} amb (null) | {p} unamb (null) | excess amb / unamb (equal sizes) | T |",
                 "|---|---|---|---|---|"]
        for layer, r in s["by_layer"].items():
            a, u, c = r["ambiguous"], r["unambiguous"], r["calibrated"]
            lines.append(f"| {layer} | {_f(a[p])} ({_f(a['null_' + p])}) | {_f(u[p])} ({_f(u['null_' + p])}) | "
                         f"{_f(c.get('excess_ambiguous'))} / {_f(c.get('excess_unambiguous'))} | "
                         f"{_f(c.get('statistic'))} |")
        lines += ["", "| layer | **p calibrated** ± MC se | Holm | p paper MWU (not calibrated) | "
                      "AUROC score [95% CI] | score - max prob [95% CI] |", "|---|---|---|---|---|---|"]
        for layer, r in s["by_layer"].items():
            c = r["calibrated"]
            corr = r.get("correctness") or {}
            auc = (corr.get("auroc") or {}).get(SCORE)
            diff = (corr.get("difference") or {}).get(MAX_PROB) or {}
            lines.append(f"| {layer} | **{_p(c)}** | {_f(c.get('p_less_holm'))} | {_f(r['paper'].get('p_less'))} | "
                         f"{_f(auc)} {_ci((corr.get('ci') or {}).get(SCORE))} | "
                         f"{_f(diff.get('value'))} {_ci(diff.get('ci'))} |")
        lines += ["", "The calibrated p-value compares the excess co-activation structure of the two groups at "
                      "equal sizes (p5 minus its null, which keeps each question's count of active features and "
                      "each feature's values): the larger of its rank p against the groups' own null and against "
                      "relabellings of the questions, never finer than 1/(draws + 1). The paper's MWU treats "
                      "feature pairs as independent and is shown for comparison only."]
        return lines


class PerQuestionProtocol(Protocol):
    """One score per question over its distinct completions; compared within strata of D."""

    name = "per_question"
    codes = ("codes_idx", "codes_val")
    p_key = "stratified_by_D"
    effect_label = "D-stratified mean score difference"

    def layer(self, plan: RivalryPlan, layer: int, ds: xr.Dataset) -> LayerResult:
        cfg = plan.cfg
        labels = plan.grouping.labels
        n = ds.sizes["question"]
        cols: dict[str, list[np.ndarray]] = {}
        fixed = True  # every completion's code has exactly k active features (TopK)
        for start in range(0, n, cfg.block_questions):
            block = slice(start, min(start + cfg.block_questions, n))
            sel = ds[list(self.codes)].sel(layer=layer).isel(question=block).load()
            vals = sel[self.codes[1]].values
            scored = score_questions(sel[self.codes[0]].values, vals, cfg.percentile, plan.first_copy[block])
            for key, value in scored.items():
                cols.setdefault(key, []).append(value)
            done = np.isfinite(plan.entropy[block])
            active = np.count_nonzero(vals[done], axis=-1)
            fixed &= bool(active.size == 0 or (active == vals.shape[-1]).all())
        per_q = {key: np.concatenate(parts) for key, parts in cols.items()}
        score = np.where(np.isfinite(plan.entropy), per_q["score"], np.nan)
        per_q["score"] = score
        grouped = (labels == AMBIGUOUS) | (labels == UNAMBIGUOUS)
        s = np.where(grouped, score, np.nan)
        summary: dict[str, Any] = {"layer": layer}
        summary[self.p_key] = stratified_permutation_test(s, labels == AMBIGUOUS, plan.distinct, cfg.n_perm, cfg.seed)
        summary[self.p_key]["what"] = (
            "labels permuted within strata of D (distinct completions): DESCRIPTIVE, NOT calibrated: answer-type "
            "features shared by one group's completions at fixed D move it without any rivalry")
        summary["descriptive"] = compare_groups(score[labels == AMBIGUOUS], score[labels == UNAMBIGUOUS], cfg.n_boot,
                                                cfg.seed)
        summary["descriptive"]["what"] = "unconditional Mann-Whitney U: confounded by D, descriptive only"
        summary["constant_features_left_out"] = int(per_q["n_constant"][grouped].sum())
        summary["questions_without_score"] = int((grouped & ~np.isfinite(score)).sum())
        summary["cautions"] = [f"layer {layer}: per_question p-values are descriptive (no calibrated null: "
                               "shared answer-type features at fixed D move them); use the paper protocol's "
                               "calibrated test for inference"]
        if fixed:
            summary["cautions"].append(
                f"layer {layer}: every completion codes exactly k = {plan.k} features (TopK): within a question the "
                "features of its few distinct completions compete for those k slots, which pulls the per-question "
                "p5 down with no rivalry, more so where they come from a small set; this score does not condition "
                "on the fixed count (the paper protocol's calibrated test does)")
        dists = {g: score[(labels == g) & np.isfinite(score)] for g in (AMBIGUOUS, UNAMBIGUOUS)}
        return LayerResult(layer, summary, per_q, dists, {})

    def by_layer(self, plan: RivalryPlan, results: list[LayerResult], out: xr.Dataset) -> None:
        out["statistic"] = ("layer", np.array([r.summary[self.p_key]["statistic"] or np.nan for r in results]))

    def text_rows(self, s: dict[str, Any]) -> list[str]:
        return [f"layer {layer}: D-stratified p = {_f(r[self.p_key].get('p_less'))} (Holm "
                f"{_f(r[self.p_key].get('p_less_holm'))}; descriptive, not calibrated), unconditional MWU p = "
                f"{_f(r['descriptive'].get('p_less'))}" for layer, r in s["by_layer"].items()]

    def markdown_rows(self, s: dict[str, Any]) -> list[str]:
        lines = ["| layer | statistic | p D-stratified (descriptive) | Holm | informative questions | "
                 "p unconditional MWU (confounded) |", "|---|---|---|---|---|---|"]
        for layer, r in s["by_layer"].items():
            c = r[self.p_key]
            lines.append(f"| {layer} | {_f(c.get('statistic'))} | {_f(c.get('p_less'))} | {_f(c.get('p_less_holm'))} | "
                         f"{c['n_informative_questions']} | {_f(r['descriptive'].get('p_less'))} |")
        lines += ["", "Per-question p-values are descriptive: no null of this score has been shown calibrated "
                      "when one group's completions share answer-type features."]
        return lines


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PaperProtocol(), PerQuestionProtocol())}


def _ci(ci: list[float] | None) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else ""


def _col(results: list[LayerResult], key: str, name: str) -> np.ndarray:
    return np.array([np.nan if (r.summary.get(key) or {}).get(name) is None else float(r.summary[key][name])
                     for r in results])


def rivalry_layer(plan: RivalryPlan, layer: int) -> LayerResult:
    """One layer: the protocol's statistics, the calibrated test, the per-prompt AUROC."""
    return plan.protocol.layer(plan, layer, open_lake(plan.cfg.ref))


def finish_rivalry(plan: RivalryPlan, results: list[LayerResult]) -> RivalryResult:
    """Holm across layers, one result group per layer and one by layer, figures."""
    cfg = plan.cfg
    proto = plan.protocol
    results = sorted(results, key=lambda r: r.layer)
    layers = [r.layer for r in results]
    p_main = _col(results, proto.p_key, "p_less")
    p_holm = holm(p_main)
    by_layer = xr.Dataset(coords={"layer": np.array(layers, np.int32)})
    name = "p_calibrated" if proto.p_key == "calibrated" else "p_descriptive"
    by_layer[name] = ("layer", p_main)
    by_layer[f"{name}_holm"] = ("layer", p_holm)
    proto.by_layer(plan, results, by_layer)
    for r, ph in zip(results, p_holm):
        r.summary.setdefault(proto.p_key, {})["p_less_holm"] = None if np.isnan(ph) else float(ph)
    lineage = lineage_of(plan.attrs)
    params = cfg.model_dump()
    groups = plan.groups_summary()
    cautions = [c for r in results for c in r.summary.get("cautions", [])]
    summary = {"protocol": cfg.protocol, "layers": layers, "groups": groups, "params": params,
               "n_samples": plan.n_samples, "k": plan.k, "cautions": cautions,
               "by_layer": {r.layer: r.summary for r in results},
               "multiple_testing": f"Holm across the layers tested, on the {proto.p_key} one-sided p-values"}
    group = result_group(cfg)
    with interrupt.working():  # a stop request waits for the result groups to be whole
        _write_layer_results(plan, results, groups, params, lineage)
        write_result_group(cfg.ref, group, by_layer, {"summary": summary, "lineage": lineage, "kind": "rivalry"},
                           plan.state)
    figures, images = {}, {}
    for key, make in (("by_layer", lambda: by_layer_figure(by_layer, cfg, cautions)),
                      ("groups", lambda: groups_figure(plan, results, cfg)),
                      ("roc", lambda: roc_figure(results, cfg))):
        fig = make()
        if fig is None:
            continue
        images[key] = figure_png(fig)  # rendered once: written beside the store and inlined in artifacts
        figures[key] = save_png(images[key], cfg.ref, f"{group}/{key}.png")
        _plt().close(fig)
    log.info("rivalry (%s) over layers %s: %s p %s, Holm %s", cfg.protocol, layers, name.replace("p_", ""),
             [_f(x) for x in p_main], [_f(x) for x in p_holm])
    return RivalryResult(group, summary, by_layer, {r.layer: r for r in results}, figures, images, cfg.store)


def _write_layer_results(plan: RivalryPlan, results: list[LayerResult], groups: dict[str, Any],
                         params: dict[str, Any], lineage: dict[str, Any]) -> None:
    """One result group per layer: the per-question table with the layer's summary."""
    cfg = plan.cfg
    for r in results:
        ds = xr.Dataset(coords={"question": plan.questions})
        ds["entropy"] = ("question", plan.entropy, {"long_name": ENTROPY_NAMES[cfg.entropy],
                                                    "note": "the entropy the groups were cut on; the lake's own "
                                                            "`entropy` is the exact first-token entropy (nats)"})
        ds["group"] = ("question", plan.grouping.labels)
        ds["distinct_completions"] = ("question", plan.distinct.astype(np.int32))
        if plan.strata is not None:
            ds["stratum"] = ("question", plan.strata)
        for key, value in r.per_question.items():
            ds[key] = ("question", value)
        attrs = {"summary": {**r.summary, "groups": groups, "params": params}, "lineage": lineage, "kind": "rivalry"}
        write_result_group(cfg.ref, result_group(cfg, r.layer), ds, attrs, plan.state)


def run_rivalry(cfg: RivalryConfig, progress: bool = False) -> RivalryResult:
    """Plan, every layer, finish: the whole study in-process (what a notebook calls)."""
    plan = plan_rivalry(cfg)
    log.info(groups_line(plan.groups_summary()))
    results = []
    with Progress(len(plan.layers), "rivalry", "layers", bar=progress, logger=log) as bar:
        for layer in plan.layers:
            results.append(rivalry_layer(plan, layer))
            bar.update()
    return finish_rivalry(plan, results)


def groups_line(g: dict[str, Any]) -> str:
    """One line on the split: sizes, the rule, the entropy used, the strata."""
    line = (f"{g[AMBIGUOUS]['n']} ambiguous, {g[UNAMBIGUOUS]['n']} unambiguous, {g['left_out']} left out "
            f"({g['rule']} rule on {g['entropy_meaning']})")
    if g.get("strata"):
        line += f"; calibrated test within {len(g['composition'])} {g['strata']} strata"
    return line


# ---------------------------------------------------------------- rendering
def render_text(summary: dict[str, Any], group: str, figures: dict[str, str], store: str) -> str:
    """The terminal summary: groups, each layer's p-values with their Monte-Carlo error, cautions."""
    proto = PROTOCOLS[summary["protocol"]]
    lines = [f"feature rivalry ({summary['protocol']} protocol), layers {summary['layers']}"]
    if (summary["groups"].get("captured") or {}).get("n_done", 0) < (summary["groups"].get("captured") or {}).get(
            "n_questions", 0):
        lines.append(summary["groups"]["captured"]["note"])
    lines += [groups_line(summary["groups"]), *proto.text_rows(summary)]
    lines += [f"caution: {c}" for c in summary.get("cautions", [])]
    lines.append(f"results: {store} group {group!r}; figures: {', '.join(figures.values()) or 'none'}")
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any], group: str, figures: dict[str, str], images: dict[str, bytes],
                    store: str) -> str:
    """The Prefect artifact: groups (and strata), the protocol's tables, cautions, figures inline."""
    proto = PROTOCOLS[summary["protocol"]]
    g = summary["groups"]
    captured = g.get("captured") or {}
    lines = [f"# Feature rivalry ({summary['protocol']} protocol), layers {summary['layers']}",
             f"store `{store}`, result group `{group}` (one group per layer beside it)", "",
             *([f"**{captured['note']}**", ""] if captured.get("n_done", 0) < captured.get("n_questions", 0) else []),
             f"| group | questions | {g['entropy_meaning']}: range |", "|---|---|---|"]
    for name in (AMBIGUOUS, UNAMBIGUOUS):
        lines.append(f"| {name} | {g[name]['n']} | {_f(g[name]['entropy_min'])} .. {_f(g[name]['entropy_max'])} |")
    lines += [f"\n{g['left_out']} questions left out ({g['rule']} rule on {g['entropy_meaning']}).", ""]
    if g.get("strata"):
        lines += [f"Strata ({g['strata']}): " + ", ".join(f"{k} {v[AMBIGUOUS]}/{v[UNAMBIGUOUS]}"
                                                          for k, v in g["composition"].items()) +
                  " (ambiguous/unambiguous)", ""]
    lines += proto.markdown_rows(summary)
    if summary.get("cautions"):
        lines += ["", "## Cautions", *[f"- {c}" for c in summary["cautions"]]]
    for key, png in images.items():
        lines += ["", f"## {key.replace('_', ' ')}", f"![{key}]({png_data_uri(png)})", f"(file: `{figures.get(key)}`)"]
    return "\n".join(lines)


# ------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_axis(ax, layers: np.ndarray) -> None:
    ax.set_xticks(layers if layers.size <= 20 else layers[:: int(np.ceil(layers.size / 20))])
    if layers.size == 1:
        ax.set_xlim(layers[0] - 1, layers[0] + 1)


def by_layer_figure(by_layer: xr.Dataset, cfg: RivalryConfig, cautions: list[str] | None = None):
    """p-value by layer (calibrated with its MC error, Holm, the paper's MWU) and effect by layer;
    the cautions printed under the plots."""
    plt = _plt()
    cautions = cautions or []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8 + 0.22 * min(len(cautions), 8)))
    L = by_layer.layer.values
    floor = 1e-300
    for name, style in (("p_calibrated", "o-"), ("p_calibrated_holm", "s--"), ("p_calibrated_pooled", "d-."),
                        ("p_paper_mwu", "x:"), ("p_descriptive", "o-"), ("p_descriptive_holm", "s--")):
        if name in by_layer:
            ax1.semilogy(L, np.maximum(by_layer[name].values, floor), style, label=name.replace("_", " "))
    if "p_calibrated_mc_se" in by_layer:
        p, se = by_layer["p_calibrated"].values, by_layer["p_calibrated_mc_se"].values
        ax1.errorbar(L, np.maximum(p, floor), yerr=np.nan_to_num(se), fmt="none", ecolor="tab:blue", capsize=3)
    ax1.axhline(0.05, color="crimson", lw=0.8)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("one-sided p (ambiguous more rival)")
    ax1.legend(fontsize=8)
    _layer_axis(ax1, L)
    if cfg.protocol == "paper":
        for g, c in ((AMBIGUOUS, "tab:orange"), (UNAMBIGUOUS, "tab:blue")):
            ax2.plot(L, by_layer[f"excess_{g}"].values, "o-", color=c, label=f"excess {g} (p5 - null p5, equal sizes)")
    ax2.plot(L, by_layer["statistic"].values, "k^-", label=PROTOCOLS[cfg.protocol].effect_label)
    ax2.axhline(0, color="0.5", lw=0.8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("effect")
    ax2.legend(fontsize=8)
    _layer_axis(ax2, L)
    fig.suptitle(f"feature rivalry by layer ({cfg.protocol} protocol)", fontsize=10)
    if cautions:
        shown = cautions[:8] + ([f"... and {len(cautions) - 8} more cautions"] if len(cautions) > 8 else [])
        fig.text(0.01, 0.01, "\n".join("caution: " + (c if len(c) < 150 else c[:147] + "...") for c in shown),
                 fontsize=7, color="crimson", va="bottom")
        fig.tight_layout(rect=(0, 0.05 * min(len(cautions), 8) / 1.5, 1, 1))
    return fig


def groups_figure(plan: RivalryPlan, results: list[LayerResult], cfg: RivalryConfig):
    """The entropy split, and the correlation distributions of the first layer tested."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    e = plan.entropy[np.isfinite(plan.entropy)]
    ax1.hist(e, bins=30, color="0.6")
    for name, value in plan.grouping.cutoffs.items():
        if name not in ("q", "gap"):
            ax1.axvline(value, color="crimson", ls="--", label=f"{name} = {value:.2f}")
    ax1.set_xlabel(ENTROPY_NAMES[cfg.entropy])
    ax1.set_ylabel("questions")
    ax1.legend(fontsize=8)
    shown = results[0]  # the first layer tested: never chosen by its p-value
    colors = {AMBIGUOUS: "tab:orange", UNAMBIGUOUS: "tab:blue", "null " + AMBIGUOUS: "tab:orange",
              "null " + UNAMBIGUOUS: "tab:blue"}
    values = [v for v in shown.dists.values() if v.size]
    if values:
        bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 40)
        for g, v in shown.dists.items():
            if v.size:
                null = g.startswith("null")
                ax2.hist(v, bins=bins, density=True, histtype="step" if null else "stepfilled",
                         alpha=1.0 if null else 0.45, color=colors[g], ls="--" if null else "-", label=f"{g} (n={v.size})")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("pairwise feature correlation across questions" if cfg.protocol == "paper"
                   else "per-question score (p5 over distinct completions)")
    ax2.set_title(f"layer {shown.layer}", fontsize=9)
    return fig


def roc_figure(results: list[LayerResult], cfg: RivalryConfig):
    """ROC curves for `correct`, one panel per layer tested (never only the best one)."""
    with_roc = [r for r in results if r.roc]
    if not with_roc:
        return None
    plt = _plt()
    n = len(with_roc)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.2 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, r in zip(axes.ravel(), with_roc):
        corr = r.summary["correctness"]
        for i, (key, (fpr, tpr)) in enumerate(r.roc.items()):
            ax.plot(fpr, tpr, styles[i % 4], lw=2.2 - 0.4 * i,
                    label=f"{PREDICTORS.get(key, key)}: {_f(corr['auroc'][key])} {_ci(corr['ci'].get(key))}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"layer {r.layer}: {corr['n_correct']} correct of {corr['n']}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(CORRECT_LABEL, fontsize=9)
    fig.tight_layout()
    return fig


def png_data_uri(png: bytes) -> str:
    """A PNG inlined as a data URI: markdown artifacts show it without access to the store."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
