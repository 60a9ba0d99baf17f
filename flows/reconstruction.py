"""The reconstruction flow: plan once, a mapped task per layer (offline; the model in the loop
on the GPU pool when asked), then the table, artifact and figure."""

from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.logs import forward_qsae_logs
from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.reconstruction import (
    LayerMetrics,
    ReconstructionConfig,
    ReconstructionPlan,
    ReconstructionResult,
    finish_reconstruction,
    model_layer,
    offline_layer,
    plan_reconstruction,
)

forward_qsae_logs()  # the jobs' log lines in each run's logs


@task(name="reconstruction-offline", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def offline_task(plan: ReconstructionPlan, layer: int) -> LayerMetrics:
    return offline_layer(plan, layer)


@task(name="reconstruction-model-in-loop", tags=["gpu"], cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_unless_bad_input)
def model_task(plan: ReconstructionPlan, layer: int) -> dict[str, float]:
    return model_layer(plan, layer)


@flow(name="qsae-reconstruction", log_prints=True)
def reconstruction_flow(config: ReconstructionConfig = ReconstructionConfig()) -> ReconstructionResult:
    """Plan, a task per layer, finish; the artifact labels each position."""
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    plan = plan_reconstruction(config)
    offline = offline_task.map(unmapped(plan), plan.layers)
    model = model_task.map(unmapped(plan), plan.layers) if config.model_in_loop else None
    result = finish_reconstruction(plan, [f.result() for f in offline], [f.result() for f in model] if model else None)
    create_table_artifact(key="qsae-reconstruction", table=result.rows(),
                          description=f"SAE reconstruction metrics, {config.store}")
    create_markdown_artifact(key="qsae-reconstruction-figure", markdown=result.to_markdown())
    return result

