"""The steering flow: plan once, a GPU task per chunk of prompts (each written with its done
marks, so a retried or rerun flow resumes), then the tests, figures and the artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.logs import forward_qsae_logs
from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.configs import SteerConfig
from qsae.jobs.progress import Progress
from qsae.jobs.steer import SteerPlan, SteerResult, finish_steer, plan_steer, steer_prompts

forward_qsae_logs()  # the jobs' log lines in each run's logs


@task(name="steer-prompts", tags=["gpu"], retries=1, retry_condition_fn=retry_unless_bad_input, retry_delay_seconds=10,
      cache_policy=NO_CACHE)
def steer_task(plan: SteerPlan, prompts: list[int]) -> int:
    return steer_prompts(plan, prompts)


@flow(name="qsae-steer", log_prints=True)
def steer_flow(config: SteerConfig = SteerConfig()) -> SteerResult:
    """Steer the rival pairs' decoder differences at the peak layer; flips against controls."""
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    plan = plan_steer(config)
    todo = [i for i in range(len(plan.prompts)) if not plan.done[i]]
    chunks = [todo[i:i + config.prompts_per_step] for i in range(0, len(todo), config.prompts_per_step)]
    futures = steer_task.map(unmapped(plan), chunks) if chunks else []
    with Progress(len(todo), f"steering layer {plan.layer} (all pending prompts)", "prompts", bar=False,
                  logger=get_run_logger(), every=0.0) as overall:
        size = {id(f): len(c) for f, c in zip(futures, chunks)}
        for future in as_completed(futures):  # the steps take turns on the model: an ETA per finished chunk
            future.result()
            overall.update(size[id(future)])
    plan.done[:] = True  # every chunk wrote its prompts; finish reads them from the store
    result = finish_steer(plan)
    create_markdown_artifact(key="qsae-steer", markdown=result.to_markdown(),
                             description=f"steering at layer {plan.layer}, {config.preset} preset")
    return result
