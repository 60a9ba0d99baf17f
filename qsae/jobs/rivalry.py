"""The rivalry study on a question lake, every captured layer, results written into the store.

Stages, as a flow composes them: ``plan_rivalry`` (open the lake once, entropy, groups,
distinct completions, correctness: everything that does not depend on the layer) ->
``rivalry_layer`` per layer (reads only that layer's codes; a mapped task) ->
``finish_rivalry`` (Holm across layers, result groups, figures). ``run_rivalry`` strings them
in-process for a notebook. Definitions: ``qsae.analysis.rivalry``.
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
    UNAMBIGUOUS,
    Grouping,
    auroc_with_ci,
    codes_matrix,
    compare_groups,
    decoder_cosine_score,
    distinct_rows,
    entropy_groups,
    first_word_entropy,
    holm,
    rivalry_test,
    roc_curve,
    score_questions,
    stratified_permutation_test,
)
from qsae.errors import LayerError, SchemaError
from qsae.jobs.configs import RivalryConfig
from qsae.lake.results import figure_png, lineage_of, save_png, write_result_group
from qsae.lake.store import open_lake

log = logging.getLogger("qsae.jobs.rivalry")




@dataclass
class RivalryPlan:
    """What every layer shares: the question table, the groups and the lake's lineage."""

    cfg: RivalryConfig
    layers: list[int]
    questions: np.ndarray
    entropy: np.ndarray
    grouping: Grouping
    distinct: np.ndarray  # D: distinct completions per question
    first_copy: np.ndarray = field(repr=False)  # (Q, S): the first sample of each distinct completion
    correct: np.ndarray | None = None  # per question: the majority of samples correct
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 0
    k: int = 0

    def groups_summary(self) -> dict[str, Any]:
        out = self.grouping.summary(self.entropy)
        out["entropy"] = self.cfg.entropy
        return out


@dataclass
class LayerResult:
    layer: int
    summary: dict[str, Any]
    per_question: dict[str, np.ndarray]
    dists: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)


@dataclass
class RivalryResult:
    group: str
    summary: dict[str, Any]
    by_layer: xr.Dataset
    layers: dict[int, LayerResult]
    figures: dict[str, str]
    images: dict[str, bytes] = field(repr=False, default_factory=dict)

    @property
    def figure(self) -> str | None:
        return self.figures.get("by_layer")


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


def plan_rivalry(cfg: RivalryConfig) -> RivalryPlan:
    """Open the lake, check it holds codes, compute the layer-independent question table."""
    ds = open_lake(cfg.ref)
    need = "prompt_codes_idx" if cfg.protocol == "paper" else "codes_idx"
    if need not in ds:
        raise SchemaError(f"{cfg.store} holds no SAE codes ({need}): capture with an SAE first")
    layers = resolve_layers(ds, cfg.layers)
    done = ds.done.values.astype(bool)
    entropy = np.where(done, question_entropy(ds, cfg.entropy), np.nan)
    grouping = entropy_groups(entropy, cfg.rule, cfg.q, cfg.threshold, cfg.high, cfg.low)
    D, first = distinct_rows(ds.completion_ids.values)
    correct = ds.correct.values.mean(axis=1) >= 0.5
    with np.errstate(over="ignore"):
        max_prob = np.exp(ds.first_logprob.values.astype(float)).max(axis=1)
    baselines = {"first-token max probability": max_prob, "-exact entropy": -ds.entropy.values.astype(float)}
    return RivalryPlan(cfg, layers, ds.question.values, entropy, grouping, np.where(done, D, 0), first,
                       np.where(done, correct, False), baselines, dict(ds.attrs), int(ds.sizes["sample"]),
                       int(ds.sizes["k"]))


def _decoder(plan: RivalryPlan, layer: int) -> tuple[np.ndarray | None, str | None]:
    """Unit-norm decoder rows of the SAE that made this layer's codes, or why not."""
    source = plan.attrs.get("sae_source")
    try:
        from qsae.sae.formats import load_sae  # torch, lazily: only for the per-prompt score

        sae = load_sae(source if not isinstance(source, dict) else source[str(layer)], layer=layer)
    except Exception as e:  # noqa: BLE001 - any reason the SAE is unreadable here is reported, not fatal
        return None, f"SAE {source!r} not readable here ({type(e).__name__}: {e})"
    want = (plan.attrs.get("sae_sha256") or {}).get(str(layer))
    if want and sae.info.sha256 != want:
        return None, f"SAE {source!r} has sha256 {sae.info.sha256[:12]}, the lake's codes came from {want[:12]}"
    W = sae.W_dec.detach().double().numpy()
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12), None


def _correctness(plan: RivalryPlan, layer: int, idx: np.ndarray, val: np.ndarray) -> tuple[dict, dict, dict]:
    cfg = plan.cfg
    W, why = _decoder(plan, layer)
    if W is None:
        return {"skipped": why}, {}, {}
    score = decoder_cosine_score(idx, val, W, top=50, pct=cfg.percentile)
    keep = np.isfinite(plan.entropy)  # done questions
    y = plan.correct[keep]
    out: dict[str, Any] = {"label": "majority of the question's samples correct",
                           "n_correct": int(y.sum()), "n": int(y.size)}
    if min(int(y.sum()), int((~y).sum())) < 10:
        out["caution"] = (f"only {int(y.sum())} correct and {int((~y).sum())} incorrect questions: "
                          "the AUROCs and their CIs say little")
    rocs = {}
    predictors = {"-rivalry score (decoder-cosine p5)": -score, **plan.baselines}
    for i, (name, s) in enumerate(predictors.items()):
        out[name] = auroc_with_ci(y, s[keep], cfg.n_boot, cfg.seed + i)
        rocs[name] = roc_curve(y, s[keep])
    return out, {"prompt_score": score}, rocs


def rivalry_layer(plan: RivalryPlan, layer: int) -> LayerResult:
    """One layer: the protocol's statistics, the calibrated test, the per-prompt AUROC."""
    cfg = plan.cfg
    ds = open_lake(cfg.ref)
    labels = plan.grouping.labels
    d_sae = int(plan.attrs["d_sae"])
    summary: dict[str, Any] = {"layer": layer}
    per_q: dict[str, np.ndarray] = {}
    dists: dict[str, np.ndarray] = {}
    if cfg.protocol == "paper":
        codes = ds[["prompt_codes_idx", "prompt_codes_val"]].sel(layer=layer).load()
        idx, val = codes.prompt_codes_idx.values, codes.prompt_codes_val.values
        pooled = np.flatnonzero((labels == AMBIGUOUS) | (labels == UNAMBIGUOUS))
        X = codes_matrix(idx[pooled], val[pooled], d_sae)
        res = rivalry_test(X, labels[pooled] == AMBIGUOUS, cfg.paper_params(), cfg.n_perm, cfg.seed, cfg.n_jobs)
        summary.update(res.as_dict(cfg.percentile))
        summary["p5_note"] = (f"p{cfg.percentile:g} of pairwise Pearson correlations across the group's questions; "
                              "null: each feature permuted across the group's questions")
        if cfg.max_features is None:
            summary["p5_note"] += "; no feature cap: exact percentile computed in bounded memory"
        dists = {AMBIGUOUS: res.ambiguous.correlations, UNAMBIGUOUS: res.unambiguous.correlations,
                 "null " + AMBIGUOUS: res.ambiguous.null_correlations,
                 "null " + UNAMBIGUOUS: res.unambiguous.null_correlations}
        summary["perm_statistics"] = {"mean": float(np.nanmean(res.perm_statistics)) if res.n_perm else None,
                                      "sd": float(np.nanstd(res.perm_statistics)) if res.n_perm else None}
        if cfg.correctness:
            summary["correctness"], extra, rocs = _correctness(plan, layer, idx, val)
            per_q.update(extra)
        else:
            rocs = {}
        return LayerResult(layer, summary, per_q, dists, rocs)
    # per_question: completion-end codes, one row per distinct completion, test conditional on D
    n = ds.sizes["question"]
    cols: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, cfg.block_questions):
        block = slice(start, min(start + cfg.block_questions, n))
        sel = ds[["codes_idx", "codes_val"]].sel(layer=layer).isel(question=block).load()
        scored = score_questions(sel.codes_idx.values, sel.codes_val.values, cfg.percentile, plan.first_copy[block])
        for key, value in scored.items():
            cols.setdefault(key, []).append(value)
    per_q = {key: np.concatenate(parts) for key, parts in cols.items()}
    score = np.where(np.isfinite(plan.entropy), per_q["score"], np.nan)
    per_q["score"] = score
    grouped = (labels == AMBIGUOUS) | (labels == UNAMBIGUOUS)
    s = np.where(grouped, score, np.nan)
    summary["calibrated"] = stratified_permutation_test(s, labels == AMBIGUOUS, plan.distinct, cfg.n_perm, cfg.seed)
    summary["calibrated"]["what"] = ("labels permuted within strata of D (distinct completions): the score moves "
                                     "with D alone; calibrated")
    summary["descriptive"] = compare_groups(score[labels == AMBIGUOUS], score[labels == UNAMBIGUOUS], cfg.n_boot,
                                            cfg.seed)
    summary["descriptive"]["what"] = "unconditional Mann-Whitney U: confounded by D, descriptive only"
    summary["constant_features_left_out"] = int(per_q["n_constant"][grouped].sum())
    summary["questions_without_score"] = int((grouped & ~np.isfinite(score)).sum())
    dists = {g: score[(labels == g) & np.isfinite(score)] for g in (AMBIGUOUS, UNAMBIGUOUS)}
    return LayerResult(layer, summary, per_q, dists, {})


def _p_less(r: LayerResult, kind: str) -> float:
    v = (r.summary.get(kind) or {}).get("p_less")
    return float("nan") if v is None else float(v)


def finish_rivalry(plan: RivalryPlan, results: list[LayerResult]) -> RivalryResult:
    """Holm across layers, one result group per layer and one by layer, figures."""
    cfg = plan.cfg
    results = sorted(results, key=lambda r: r.layer)
    layers = [r.layer for r in results]
    p_cal = np.array([_p_less(r, "calibrated") for r in results])
    p_holm = holm(p_cal)
    by_layer = xr.Dataset(coords={"layer": np.array(layers, np.int32)})
    by_layer["p_calibrated"] = ("layer", p_cal)
    by_layer["p_calibrated_holm"] = ("layer", p_holm)
    if cfg.protocol == "paper":
        by_layer["p_paper_mwu"] = ("layer", np.array([_p_less(r, "paper") for r in results]))
        by_layer["statistic"] = ("layer", np.array([r.summary["calibrated"]["statistic"] for r in results]))
        for g in (AMBIGUOUS, UNAMBIGUOUS):
            tag = f"p{cfg.percentile:g}"
            by_layer[f"{tag}_{g}"] = ("layer", np.array([r.summary[g][tag] for r in results]))
            by_layer[f"null_{tag}_{g}"] = ("layer", np.array([r.summary[g][f"null_{tag}"] for r in results]))
            by_layer[f"excess_{g}"] = ("layer", np.array([r.summary[g]["excess"] for r in results]))
    else:
        by_layer["statistic"] = ("layer", np.array([r.summary["calibrated"]["statistic"] or np.nan for r in results]))
    for r, ph in zip(results, p_holm):
        r.summary.setdefault("calibrated", {})["p_less_holm"] = None if np.isnan(ph) else float(ph)
    lineage = lineage_of(plan.attrs)
    params = cfg.model_dump()
    for r in results:
        ds = xr.Dataset(coords={"question": plan.questions})
        ds["entropy"] = ("question", plan.entropy)
        ds["group"] = ("question", plan.grouping.labels)
        ds["distinct_completions"] = ("question", plan.distinct.astype(np.int32))
        for key, value in r.per_question.items():
            ds[key] = ("question", value)
        attrs = {"summary": {**r.summary, "groups": plan.groups_summary(), "params": params}, "lineage": lineage,
                 "kind": "rivalry"}
        write_result_group(cfg.ref, result_group(cfg, r.layer), ds, attrs)
    summary = {"protocol": cfg.protocol, "layers": layers, "groups": plan.groups_summary(), "params": params,
               "n_samples": plan.n_samples, "k": plan.k,
               "by_layer": {r.layer: r.summary for r in results},
               "multiple_testing": "Holm across the layers tested, on the calibrated one-sided p-values"}
    group = result_group(cfg)
    write_result_group(cfg.ref, group, by_layer, {"summary": summary, "lineage": lineage, "kind": "rivalry"})
    figures, images = {}, {}
    for key, make in (("by_layer", lambda: by_layer_figure(by_layer, cfg)),
                      ("groups", lambda: groups_figure(plan, results, cfg)),
                      ("roc", lambda: roc_figure(results, cfg))):
        fig = make()
        if fig is None:
            continue
        images[key] = figure_png(fig)  # rendered once: written beside the store and inlined in artifacts
        figures[key] = save_png(images[key], cfg.ref, f"{group}/{key}.png")
        _plt().close(fig)
    log.info("rivalry (%s) over layers %s: calibrated p %s, Holm %s", cfg.protocol, layers,
             np.round(p_cal, 4).tolist(), np.round(p_holm, 4).tolist())
    return RivalryResult(group, summary, by_layer, {r.layer: r for r in results}, figures, images)


def run_rivalry(cfg: RivalryConfig, progress: bool = False) -> RivalryResult:
    """Plan, every layer, finish: the whole study in-process (what a notebook calls)."""
    plan = plan_rivalry(cfg)
    g = plan.groups_summary()
    log.info("%d ambiguous, %d unambiguous (%s on %s entropy), %d left out", g[AMBIGUOUS]["n"], g[UNAMBIGUOUS]["n"],
             cfg.rule, cfg.entropy, g["left_out"])
    layers = plan.layers
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="rivalry layers")
    return finish_rivalry(plan, [rivalry_layer(plan, layer) for layer in layers])


# ------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def by_layer_figure(by_layer: xr.Dataset, cfg: RivalryConfig):
    """p-value by layer (calibrated, Holm, the paper's MWU) and effect by layer."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    L = by_layer.layer.values
    floor = 1e-300
    for name, style in (("p_calibrated", "o-"), ("p_calibrated_holm", "s--"), ("p_paper_mwu", "x:")):
        if name in by_layer:
            ax1.semilogy(L, np.maximum(by_layer[name].values, floor), style, label=name.replace("_", " "))
    ax1.axhline(0.05, color="crimson", lw=0.8)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("one-sided p (ambiguous more rival)")
    ax1.legend(fontsize=7)
    if cfg.protocol == "paper":
        for g, c in ((AMBIGUOUS, "tab:orange"), (UNAMBIGUOUS, "tab:blue")):
            ax2.plot(L, by_layer[f"excess_{g}"].values, "o-", color=c, label=f"excess {g} (p5 - null p5)")
        ax2.plot(L, by_layer["statistic"].values, "k^-", label="T = excess amb - excess unamb")
    else:
        ax2.plot(L, by_layer["statistic"].values, "k^-", label="D-stratified mean score difference")
    ax2.axhline(0, color="0.5", lw=0.8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("effect")
    ax2.legend(fontsize=7)
    fig.suptitle(f"feature rivalry by layer ({cfg.protocol} protocol)", fontsize=10)
    return fig


def groups_figure(plan: RivalryPlan, results: list[LayerResult], cfg: RivalryConfig):
    """The entropy split, and the correlation distributions at the layer with the lowest p."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    e = plan.entropy[np.isfinite(plan.entropy)]
    ax1.hist(e, bins=30, color="0.6")
    for name, value in plan.grouping.cutoffs.items():
        if name not in ("q", "gap"):
            ax1.axvline(value, color="crimson", ls="--", label=f"{name} = {value:.2f}")
    ax1.set_xlabel(f"{cfg.entropy} entropy")
    ax1.set_ylabel("questions")
    ax1.legend(fontsize=8)
    best = min(results, key=lambda r: np.nan_to_num(_p_less(r, "calibrated"), nan=2.0))
    colors = {AMBIGUOUS: "tab:orange", UNAMBIGUOUS: "tab:blue", "null " + AMBIGUOUS: "tab:orange",
              "null " + UNAMBIGUOUS: "tab:blue"}
    values = [v for v in best.dists.values() if v.size]
    if values:
        bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 40)
        for g, v in best.dists.items():
            if v.size:
                null = g.startswith("null")
                ax2.hist(v, bins=bins, density=True, histtype="step" if null else "stepfilled",
                         alpha=1.0 if null else 0.45, color=colors[g], ls="--" if null else "-", label=f"{g} (n={v.size})")
    ax2.set_xlabel("pairwise feature correlation across questions" if cfg.protocol == "paper"
                   else "per-question score (p5 over distinct completions)")
    if values:
        ax2.legend(fontsize=7)
    ax2.set_title(f"layer {best.layer}: calibrated p={_p_less(best, 'calibrated'):.3g}", fontsize=9)
    return fig


def roc_figure(results: list[LayerResult], cfg: RivalryConfig):
    """ROC curves for `correct` at the layer with the highest rivalry-score AUROC."""
    with_roc = [r for r in results if r.roc]
    if not with_roc:
        return None
    name = "-rivalry score (decoder-cosine p5)"
    best = max(with_roc, key=lambda r: np.nan_to_num(r.summary["correctness"][name]["auroc"], nan=-1))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for key, (fpr, tpr) in best.roc.items():
        a = best.summary["correctness"][key]
        ci = a.get("ci") or [np.nan, np.nan]
        ax.plot(fpr, tpr, label=f"{key}: {a['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"predicting `correct`, layer {best.layer}", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    return fig


def png_data_uri(png: bytes) -> str:
    """A PNG inlined as a data URI: markdown artifacts show it without access to the store."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
