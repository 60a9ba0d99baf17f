"""The rivalry study's stages, as a flow composes them: ``plan_rivalry`` (once) ->
``rivalry_layer`` per layer (a mapped task) -> ``finish_rivalry`` (Holm across layers, result
groups, figures); ``run_rivalry`` strings them in-process for a notebook."""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from qsae.analysis.rivalry import holm
from qsae.jobs import interrupt
from qsae.jobs.configs import RivalryConfig
from qsae.jobs.figures import pyplot
from qsae.jobs.progress import Progress
from qsae.lake.results import figure_png, lineage_of, save_png, write_result_group
from qsae.lake.store import open_lake

from .figures import by_layer_figure, groups_figure, roc_figure
from .layers import PROTOCOLS, LayerResult
from .plan import ENTROPY_NAMES, RivalryPlan, plan_rivalry, result_group
from .report import RivalryResult, fmt, groups_line

log = logging.getLogger("qsae.jobs.rivalry")


def rivalry_layer(plan: RivalryPlan, layer: int) -> LayerResult:
    """One layer: the protocol's statistics, the calibrated test, the per-prompt AUROC."""
    return PROTOCOLS[plan.cfg.protocol].layer(plan, layer, open_lake(plan.cfg.ref))


def finish_rivalry(plan: RivalryPlan, results: list[LayerResult]) -> RivalryResult:
    """Holm across layers, one result group per layer and one by layer, figures."""
    cfg = plan.cfg
    proto = PROTOCOLS[cfg.protocol]
    results = sorted(results, key=lambda r: r.layer)
    layers = [r.layer for r in results]
    p_main = np.array([np.nan if r.test.p_less is None else r.test.p_less for r in results])
    p_holm = holm(p_main)
    for r, ph in zip(results, p_holm):
        r.p_less_holm = None if np.isnan(ph) else float(ph)
    by_layer = xr.Dataset(coords={"layer": np.array(layers, np.int32)})
    name = "p_calibrated" if cfg.protocol == "paper" else "p_descriptive"
    by_layer[name] = ("layer", p_main)
    by_layer[f"{name}_holm"] = ("layer", p_holm)
    proto.by_layer(plan, results, by_layer)
    res = RivalryResult(result_group(cfg), cfg.protocol, {r.layer: r for r in results}, plan.groups_summary(),
                        cfg.model_dump(), by_layer, {}, store=cfg.store, n_samples=plan.n_samples, k=plan.k)
    lineage = lineage_of(plan.attrs)
    summary = res.summary
    with interrupt.working():  # a stop request waits for the result groups to be whole
        for r in results:
            attrs = {"summary": {**r.to_dict(), "groups": res.groups, "params": res.params}, "lineage": lineage,
                     "kind": "rivalry"}
            write_result_group(cfg.ref, result_group(cfg, r.layer), _per_question(plan, r), attrs, plan.state)
        write_result_group(cfg.ref, res.group, by_layer, {"summary": summary, "lineage": lineage, "kind": "rivalry"},
                           plan.state)
    for key, make in (("by_layer", lambda: by_layer_figure(by_layer, cfg, res.cautions)),
                      ("groups", lambda: groups_figure(plan, results, cfg)),
                      ("roc", lambda: roc_figure(results, cfg))):
        fig = make()
        if fig is None:
            continue
        res.images[key] = figure_png(fig)  # rendered once: written beside the store and inlined in artifacts
        res.figures[key] = save_png(res.images[key], cfg.ref, f"{res.group}/{key}.png")
        pyplot().close(fig)
    log.info("rivalry (%s) over layers %s: %s p %s, Holm %s", cfg.protocol, layers, name.replace("p_", ""),
             [fmt(x) for x in p_main], [fmt(x) for x in p_holm])
    return res


def _per_question(plan: RivalryPlan, r: LayerResult) -> xr.Dataset:
    """A layer's per-question table: the entropy the groups were cut on, the group, D, scores."""
    ds = xr.Dataset(coords={"question": plan.questions})
    ds["entropy"] = ("question", plan.entropy, {"long_name": ENTROPY_NAMES[plan.cfg.entropy],
                                                "note": "the entropy the groups were cut on; the lake's own "
                                                        "`entropy` is the exact first-token entropy (nats)"})
    ds["group"] = ("question", plan.grouping.labels)
    ds["distinct_completions"] = ("question", plan.distinct.astype(np.int32))
    if plan.strata is not None:
        ds["stratum"] = ("question", plan.strata)
    for key, value in r.per_question.items():
        ds[key] = ("question", value)
    return ds


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



