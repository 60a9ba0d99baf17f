"""The rivalry study's figures: p-value and effect by layer, the groups' correlation
distributions, ROC curves for `correct` (every layer tested, never only the best one)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from qsae.analysis.rivalry import AMBIGUOUS, UNAMBIGUOUS
from qsae.jobs.configs import RivalryConfig
from qsae.jobs.figures import pyplot

from .layers import PROTOCOLS, LayerResult
from .plan import CORRECT_LABEL, ENTROPY_NAMES, PREDICTORS, RivalryPlan
from .report import ci_text, fmt


def _layer_axis(ax, layers: np.ndarray) -> None:
    ax.set_xticks(layers if layers.size <= 20 else layers[:: int(np.ceil(layers.size / 20))])
    if layers.size == 1:
        ax.set_xlim(layers[0] - 1, layers[0] + 1)


def by_layer_figure(by_layer: xr.Dataset, cfg: RivalryConfig, cautions: list[str] | None = None):
    """p-value by layer (calibrated with its MC error, Holm, the paper's MWU) and effect by layer;
    the cautions printed under the plots."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
    n = len(with_roc)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.2 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, r in zip(axes.ravel(), with_roc):
        corr = r.correctness
        for i, (key, (fpr, tpr)) in enumerate(r.roc.items()):
            ax.plot(fpr, tpr, styles[i % 4], lw=2.2 - 0.4 * i,
                    label=f"{PREDICTORS.get(key, key)}: {fmt(corr.paired.auroc[key])} {ci_text(corr.paired.ci.get(key))}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"layer {r.layer}: {corr.n_correct} correct of {corr.n}", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(CORRECT_LABEL, fontsize=9)
    fig.tight_layout()
    return fig
