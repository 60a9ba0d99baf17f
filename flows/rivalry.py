"""The rivalry flow: plan once, one mapped task per layer, then Holm, results and the artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.rivalry import (
    LayerResult,
    RivalryConfig,
    RivalryPlan,
    RivalryResult,
    finish_rivalry,
    plan_rivalry,
    png_data_uri,
    rivalry_layer,
)


@task(name="rivalry-layer", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def rivalry_layer_task(plan: RivalryPlan, layer: int) -> LayerResult:
    return rivalry_layer(plan, layer)


@task(name="rivalry-finish", cache_policy=NO_CACHE)
def finish_task(plan: RivalryPlan, results: list[LayerResult]) -> RivalryResult:
    return finish_rivalry(plan, results)


def _fmt(x: Any) -> str:
    return "n/a" if x is None or x != x else f"{x:.3g}"


def summary_markdown(result: RivalryResult, store: str) -> str:
    """The artifact: groups, both p-values per layer (saying which is calibrated), the figures inline."""
    s = result.summary
    g = s["groups"]
    lines = [f"# Feature rivalry ({s['protocol']} protocol), layers {s['layers']}",
             f"store `{store}`, result group `{result.group}` (one group per layer beside it)", "",
             "| group | questions | entropy range |", "|---|---|---|"]
    for name in ("ambiguous", "unambiguous"):
        lines.append(f"| {name} | {g[name]['n']} | {_fmt(g[name]['entropy_min'])} .. {_fmt(g[name]['entropy_max'])} |")
    lines += [f"\n{g['left_out']} questions left out ({g['rule']} rule on {g['entropy']} entropy).", ""]
    p = f"p{s['params']['percentile']:g}"
    if s["protocol"] == "paper":
        lines += [f"| layer | {p} amb (null) | {p} unamb (null) | T = excess amb - excess unamb |", "|---|---|---|---|"]
        for layer, r in s["by_layer"].items():
            a, u = r["ambiguous"], r["unambiguous"]
            lines.append(f"| {layer} | {_fmt(a[p])} ({_fmt(a['null_' + p])}) | {_fmt(u[p])} ({_fmt(u['null_' + p])}) | "
                         f"{_fmt(r['calibrated']['statistic'])} |")
        lines += ["", "| layer | **p calibrated** | Holm | p paper MWU (not calibrated) | AUROC for correct [95% CI] |",
                  "|---|---|---|---|---|"]
        cautions = set()
        for layer, r in s["by_layer"].items():
            c = r["calibrated"]
            corr = r.get("correctness") or {}
            roc = corr.get("-rivalry score (decoder-cosine p5)") or {}
            ci = roc.get("ci") or [None, None]
            cautions.update(x for x in (corr.get("caution"), corr.get("skipped")) if x)
            lines.append(f"| {layer} | **{_fmt(c['p_less'])}** | {_fmt(c.get('p_less_holm'))} | "
                         f"{_fmt(r['paper'].get('p_less'))} | {_fmt(roc.get('auroc'))} [{_fmt(ci[0])}, {_fmt(ci[1])}] |")
        lines += ["", "The calibrated p-value permutes the ambiguous/unambiguous labels and compares the excess "
                      "co-activation structure (p5 minus its feature-marginal null); the paper's MWU treats "
                      "feature pairs as independent and is shown for comparison only."]
        lines += [f"\nAUROC: {c}" for c in sorted(cautions)]
    else:
        lines += ["| layer | statistic | **p calibrated (D-stratified)** | Holm | informative questions | "
                  "p unconditional MWU (confounded) |", "|---|---|---|---|---|---|"]
        for layer, r in s["by_layer"].items():
            c = r["calibrated"]
            lines.append(f"| {layer} | {_fmt(c.get('statistic'))} | **{_fmt(c.get('p_less'))}** | "
                         f"{_fmt(c.get('p_less_holm'))} | {c['n_informative_questions']} | "
                         f"{_fmt(r['descriptive'].get('p_less'))} |")
    for key, png in result.images.items():
        lines += ["", f"## {key.replace('_', ' ')}", f"![{key}]({png_data_uri(png)})",
                  f"(file: `{result.figures.get(key)}`)"]
    return "\n".join(lines)


@flow(name="qsae-rivalry", log_prints=True)
def rivalry_flow(config: RivalryConfig = RivalryConfig()) -> dict[str, Any]:
    """Plan, a task per layer, finish; the artifact shows both p-values and the figures."""
    logger = get_run_logger()
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    plan = plan_rivalry(config)
    g = plan.groups_summary()
    logger.info(f"{g['ambiguous']['n']} ambiguous, {g['unambiguous']['n']} unambiguous, {g['left_out']} left out; "
                f"layers {plan.layers}")
    futures = rivalry_layer_task.map(unmapped(plan), plan.layers)
    result = finish_task(plan, [f.result() for f in futures])
    create_markdown_artifact(key="qsae-rivalry", markdown=summary_markdown(result, config.store),
                             description=f"rivalry, {config.protocol}, layers {plan.layers}")
    return {"group": result.group, "figure": result.figure, "figures": result.figures, "summary": result.summary}
