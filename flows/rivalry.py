"""The rivalry flow: plan once, one mapped task per layer, then Holm, results and the artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.logs import forward_qsae_logs
from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.rivalry import (
    LayerResult,
    RivalryConfig,
    RivalryPlan,
    RivalryResult,
    finish_rivalry,
    groups_line,
    plan_rivalry,
    rivalry_layer,
)

forward_qsae_logs()  # the jobs' log lines in each run's logs


@task(name="rivalry-layer", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def rivalry_layer_task(plan: RivalryPlan, layer: int) -> LayerResult:
    return rivalry_layer(plan, layer)


@task(name="rivalry-finish", cache_policy=NO_CACHE)
def finish_task(plan: RivalryPlan, results: list[LayerResult]) -> RivalryResult:
    return finish_rivalry(plan, results)


@flow(name="qsae-rivalry", log_prints=True)
def rivalry_flow(config: RivalryConfig = RivalryConfig()) -> RivalryResult:
    """Plan, a task per layer, finish; the artifact shows both p-values and the figures."""
    logger = get_run_logger()
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    plan = plan_rivalry(config)
    g = plan.groups_summary()
    logger.info(f"{groups_line(g)}; layers {plan.layers}")
    futures = rivalry_layer_task.map(unmapped(plan), plan.layers)
    result = finish_task(plan, [f.result() for f in futures])
    create_markdown_artifact(key="qsae-rivalry", markdown=result.to_markdown(),
                             description=f"rivalry, {config.protocol}, layers {plan.layers}")
    return result
