"""Run the rivalry study on a question lake and write its results into the same store.

Reads lazily with xarray, question block by question block (shard-aligned), so memory
stays bounded on a 14k-question lake; see ``qsae.analysis.rivalry`` for every definition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field

from qsae.analysis.rivalry import (
    AMBIGUOUS,
    UNAMBIGUOUS,
    across_questions,
    compare_groups,
    entropy_groups,
    score_questions,
)
from qsae.errors import LayerError
from qsae.lake.results import lineage_of, save_figure, write_result_group
from qsae.lake.store import open_lake

log = logging.getLogger("qsae.analysis.rivalry")


class RivalryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = "storage/lakes/demo.zarr"
    storage_options: dict[str, Any] | None = None
    layer: int | None = Field(None, description="default: 20 if captured, else the lake's middle layer")
    mode: Literal["per_question", "across_questions"] = "per_question"
    rule: Literal["median", "quantile", "threshold"] = "median"
    q: float = Field(0.25, gt=0, le=0.5, description="quantile rule: top/bottom fraction")
    threshold: float | None = None
    entropy: Literal["exact", "sampled"] = "exact"
    percentile: float = Field(5.0, gt=0, lt=100)
    min_questions: int = Field(5, ge=1, description="across mode: keep features active in >= this many questions")
    n_boot: int = Field(1000, ge=0)
    seed: int = 0
    block_questions: int = Field(256, ge=1, description="questions read per block")
    dask_address: str | None = Field(None, description="score blocks on dask: 'local' or a scheduler address")


def choose_layer(ds: xr.Dataset, layer: int | None) -> int:
    layers = [int(x) for x in ds.layer.values]
    if layer is None:
        return 20 if 20 in layers else layers[len(layers) // 2]
    if layer not in layers:
        raise LayerError(f"layer {layer} is not in the lake (layers {layers})")
    return layer


def result_group(cfg: RivalryConfig, layer: int) -> str:
    return f"rivalry/layer_{layer}/{cfg.mode}"


@dataclass
class RivalryResult:
    group: str
    summary: dict[str, Any]
    per_question: xr.Dataset
    figure: str | None


def question_blocks(n: int, block: int) -> list[slice]:
    return [slice(i, min(i + block, n)) for i in range(0, n, block)]


def score_block(ds: xr.Dataset, layer: int, block: slice, pct: float) -> dict[str, np.ndarray]:
    """Per-question scores of one block of questions (reads only that block's codes)."""
    sel = ds[["codes_idx", "codes_val"]].sel(layer=layer).isel(question=block).load()
    return score_questions(sel.codes_idx.values, sel.codes_val.values, pct)


def score_block_at(store: str, storage_options: dict | None, layer: int, start: int, stop: int,
                   pct: float) -> dict[str, np.ndarray]:
    """``score_block`` by URL: what a dask worker or a Prefect task runs on its own."""
    ds = open_lake(store, storage_options=storage_options)
    return score_block(ds, layer, slice(start, stop), pct)


def run_rivalry(cfg: RivalryConfig, log_fn: Callable[[str], None] = log.info, progress: bool = False,
                blocks_done: dict[int, dict[str, np.ndarray]] | None = None) -> RivalryResult:
    """Groups, scores, tests; writes ``rivalry/layer_<L>/<mode>`` and a PNG into the store.

    ``blocks_done`` lets a caller (the flow's mapped tasks) pass per-question scores it
    computed already, keyed by block start.
    """
    ds = open_lake(cfg.store, storage_options=cfg.storage_options)
    if "codes_idx" not in ds:
        raise ValueError(f"{cfg.store} holds no SAE codes: capture with an SAE first")
    layer = choose_layer(ds, cfg.layer)
    done = ds.done.values
    entropy = (ds.entropy if cfg.entropy == "exact" else ds.sample_entropy).values.astype(float)
    entropy = np.where(done, entropy, np.nan)
    grouping = entropy_groups(entropy, cfg.rule, cfg.q, cfg.threshold)
    gsum = grouping.summary(entropy)
    log_fn(f"layer {layer}: {gsum[AMBIGUOUS]['n']} ambiguous, {gsum[UNAMBIGUOUS]['n']} unambiguous "
           f"({cfg.rule} split on {cfg.entropy} entropy), {gsum['left_out']} left out")
    n = ds.sizes["question"]
    per_q = xr.Dataset(coords={"question": ds.question.values})
    per_q["entropy"] = ("question", entropy)
    per_q["group"] = ("question", grouping.labels)
    summary: dict[str, Any] = {"layer": layer, "mode": cfg.mode, "groups": gsum, "params": cfg.model_dump(),
                               "n_samples": int(ds.sizes["sample"]), "k": int(ds.sizes["k"])}
    if cfg.mode == "per_question":
        from qsae.jobs.dask_compute import map_blocks

        cols: dict[str, list[np.ndarray]] = {}
        blocks = question_blocks(n, cfg.block_questions)
        todo = [b for b in blocks if b.start not in (blocks_done or {})]
        if cfg.dask_address is None:  # in-process: score on the dataset already open
            scored = map_blocks(lambda start, stop: score_block(ds, layer, slice(start, stop), cfg.percentile),
                                [(b.start, b.stop) for b in todo], None, progress)
        else:  # dask workers open the lake themselves, by URL
            scored = map_blocks(score_block_at, [(cfg.store, cfg.storage_options, layer, b.start, b.stop,
                                                  cfg.percentile) for b in todo], cfg.dask_address, progress)
        by_start = {**(blocks_done or {}), **{b.start: r for b, r in zip(todo, scored)}}
        for b in blocks:
            for key, value in by_start[b.start].items():
                cols.setdefault(key, []).append(value)
        for key, parts in cols.items():
            per_q[key] = ("question", np.concatenate(parts))
        score = np.where(done, per_q.score.values, np.nan)
        per_q["score"] = ("question", score)
        summary["constant_features_left_out"] = int(per_q.n_constant.values[done].sum())
        summary["questions_without_score"] = int((done & ~np.isfinite(score)).sum())
        summary["test"] = compare_groups(score[grouping.labels == AMBIGUOUS], score[grouping.labels == UNAMBIGUOUS],
                                         n_boot=cfg.n_boot, seed=cfg.seed)
        dists = {g: score[(grouping.labels == g) & np.isfinite(score)] for g in (AMBIGUOUS, UNAMBIGUOUS)}
    else:
        codes = ds[["prompt_codes_idx", "prompt_codes_val"]].sel(layer=layer).load()
        dists, groups = {}, {}
        for g in (AMBIGUOUS, UNAMBIGUOUS):
            rows = np.flatnonzero(grouping.labels == g)
            res = across_questions(codes.prompt_codes_idx.values[rows], codes.prompt_codes_val.values[rows],
                                   cfg.min_questions, cfg.percentile, cfg.n_boot, cfg.seed)
            groups[g] = {"n_questions": res.n_questions, "n_features": res.n_features, "n_pairs": res.n_pairs,
                         f"p{cfg.percentile:g}": res.p5, "bootstrap_bias": res.bootstrap_bias,
                         f"p{cfg.percentile:g}_bias_corrected": res.p5_bias_corrected,
                         "ci95_population": list(res.ci)}
            dists[g] = res.correlations
        summary["across"] = groups
        summary["test"] = compare_groups(dists[AMBIGUOUS], dists[UNAMBIGUOUS], n_boot=min(cfg.n_boot, 200), seed=cfg.seed)
        summary["test"]["caveat"] = ("units are feature pairs, which are not independent: read the bootstrap "
                                     "CIs over questions in `across`, not this p-value")
    t = summary["test"]
    if t.get("p_two_sided") is not None:
        log_fn(f"Mann-Whitney U={t['U']:.1f}, p(two-sided)={t['p_two_sided']:.3g}, p(ambiguous lower)={t['p_less']:.3g}, "
               f"rank-biserial={t['rank_biserial']:.3f}")
    group = result_group(cfg, layer)
    attrs = {"summary": summary, "lineage": lineage_of(dict(ds.attrs)), "kind": "rivalry"}
    write_result_group(cfg.store, group, per_q, attrs, cfg.storage_options)
    fig_url = None
    try:
        fig = rivalry_figure(entropy, grouping, dists, summary, cfg)
        fig_url = save_figure(fig, cfg.store, f"{group}/figure.png", cfg.storage_options)
    except ImportError:  # matplotlib is a dependency; stay usable without it
        pass
    return RivalryResult(group, summary, per_q, fig_url)


def rivalry_figure(entropy: np.ndarray, grouping, dists: dict[str, np.ndarray], summary: dict[str, Any], cfg: RivalryConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ok = np.isfinite(entropy)
    ax1.hist(entropy[ok], bins=30, color="0.6")
    for name, value in grouping.cutoffs.items():
        if name != "q":
            ax1.axvline(value, color="crimson", ls="--", label=f"{name} = {value:.2f}")
    ax1.set_xlabel(f"first-token entropy ({cfg.entropy}, nats)")
    ax1.set_ylabel("questions")
    ax1.legend(fontsize=8)
    colors = {AMBIGUOUS: "tab:orange", UNAMBIGUOUS: "tab:blue"}
    values = [v for v in dists.values() if v.size]
    bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 30) if values else 10
    for g, v in dists.items():
        if v.size:
            ax2.hist(v, bins=bins, alpha=0.55, color=colors[g], label=f"{g} (n={v.size})", density=True)
    what = "per-question rivalry score (p5 of feature correlations)" if cfg.mode == "per_question" else \
        "pairwise feature correlation across questions"
    ax2.set_xlabel(what)
    ax2.legend(fontsize=8)
    t = summary["test"]
    if t.get("p_two_sided") is not None:
        ax2.set_title(f"MWU p={t['p_two_sided']:.3g} (one-sided {t['p_less']:.3g}), r_rb={t['rank_biserial']:.2f}",
                      fontsize=9)
    fig.suptitle(f"feature rivalry, layer {summary['layer']}, {cfg.mode}", fontsize=10)
    return fig
