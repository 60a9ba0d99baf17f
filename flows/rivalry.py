"""The rivalry flow: per-question scores mapped over question blocks, then the tests and outputs."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.rivalry import RivalryConfig, choose_layer, question_blocks, run_rivalry, score_block_at
from qsae.lake.results import summary_json
from qsae.lake.store import open_lake


@task(name="rivalry-scores", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def score_block_task(config: RivalryConfig, layer: int, start: int, stop: int) -> dict[str, Any]:
    scores = score_block_at(config.store, config.storage_options, layer, start, stop, config.percentile)
    return {"start": start, "scores": scores}


def summary_markdown(result, store: str) -> str:
    s = result.summary
    t = s["test"]
    g = s["groups"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
    lines = [
        f"# Feature rivalry: layer {s['layer']}, {s['mode']}",
        f"store `{store}`, result group `{result.group}`" + (f", figure `{result.figure}`" if result.figure else ""),
        "",
        "| group | n | entropy range | median score | p5 of scores |",
        "|---|---|---|---|---|",
    ]
    for name in ("ambiguous", "unambiguous"):
        lines.append(f"| {name} | {g[name]['n']} | {fmt(g[name]['entropy_min'])} .. {fmt(g[name]['entropy_max'])} | "
                     f"{fmt(t.get('median_' + name))} | {fmt(t.get('p5_' + name))} |")
    lines += ["", "| U | p two-sided | p (ambiguous lower) | rank-biserial | median diff [95% CI] |", "|---|---|---|---|---|",
              f"| {fmt(t.get('U'))} | {fmt(t.get('p_two_sided'))} | {fmt(t.get('p_less'))} | {fmt(t.get('rank_biserial'))} | "
              f"{fmt(t.get('median_diff'))} [{', '.join(fmt(x) for x in t.get('median_diff_ci') or [])}] |", "",
              "```json", summary_json(s)[:4000], "```"]
    return "\n".join(lines)


@flow(name="qsae-rivalry", log_prints=True)
def rivalry_flow(config: RivalryConfig = RivalryConfig()) -> dict[str, Any]:
    """Score question blocks as mapped tasks, then group, test and write the results."""
    logger = get_run_logger()
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    ds = open_lake(config.store, storage_options=config.storage_options)
    layer = choose_layer(ds, config.layer)
    config = config.model_copy(update={"layer": layer})
    done = {}
    if config.mode == "per_question" and config.dask_address is None:  # else dask scores the blocks
        blocks = question_blocks(ds.sizes["question"], config.block_questions)
        futures = score_block_task.map(unmapped(config), unmapped(layer), [b.start for b in blocks], [b.stop for b in blocks])
        done = {r["start"]: r["scores"] for r in (f.result() for f in futures)}
    result = run_rivalry(config, logger.info, blocks_done=done)
    create_markdown_artifact(key="qsae-rivalry", markdown=summary_markdown(result, config.store),
                             description=f"rivalry, layer {layer}, {config.mode}")
    return {"group": result.group, "figure": result.figure, "summary": result.summary}
