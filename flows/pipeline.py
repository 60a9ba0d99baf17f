"""The pipeline: capture -> rivalry and reconstruction for one config, as subflows.

Scale-out: with ``capture_deployment`` set, the pending shards are split into contiguous,
shard-aligned groups, one per work queue in ``gpu_queues`` (one queue, limit 1, per GPU:
see ``deployments/setup_pools.sh``), and each group runs as a flow run of the capture
deployment on whichever worker serves that queue. Workers write disjoint shards of the same
store; the parent waits for all of them, then runs the analyses.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.capture import capture_flow, prepare_store
from flows.logs import forward_qsae_logs
from flows.reconstruction import reconstruction_flow
from flows.rivalry import rivalry_flow
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.capture import CaptureConfig
from qsae.jobs.pipeline import PipelineResult, record_capture
from qsae.jobs.reconstruction import ReconstructionConfig
from qsae.jobs.rivalry import RivalryConfig

forward_qsae_logs()  # the jobs' log lines in each run's logs


def split_shards(pending: list[int], n: int) -> list[list[int]]:
    """Contiguous, nearly equal groups of pending shards (empty groups dropped)."""
    n = max(1, min(n, len(pending)))
    size, extra = divmod(len(pending), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (1 if i < extra else 0)
        out.append(pending[start:stop])
        start = stop
    return [g for g in out if g]


@task(name="fan-out-capture", cache_policy=NO_CACHE)
def fan_out_capture(config: CaptureConfig, deployment: str, groups: list[list[int]], queues: list[str],
                    shards_per_task: int, poll_seconds: float = 2.0) -> list[dict[str, Any]]:
    """Start one capture flow run per shard group on its queue, wait for all, fail if any failed."""
    logger = get_run_logger()
    runs = []
    for group, queue in zip(groups, queues):
        run = run_deployment(deployment, parameters={"config": config.model_dump(mode="json"), "shards": group,
                                                     "shards_per_task": shards_per_task},
                             work_queue_name=queue, timeout=0, as_subflow=True)
        logger.info(f"shards {group} -> queue {queue}: flow run {run.name} ({run.id})")
        runs.append(run)
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(r.id) for r in runs]
            if all(r.state is not None and r.state.is_final() for r in current):
                break
            time.sleep(poll_seconds)
    failed = [r for r in current if not r.state.is_completed()]
    if failed:
        raise RuntimeError(f"capture runs failed: {[(r.name, r.state.name) for r in failed]}; rerun the pipeline "
                           "to resume (done shards are skipped)")
    return [{"flow_run": r.name, "id": str(r.id), "worker": r.labels.get("prefect.worker.name"),
             "queue": r.work_queue_name, "shards": g} for r, g in zip(current, groups)]


@flow(name="qsae-pipeline", log_prints=True)
def pipeline_flow(
    config: CaptureConfig = CaptureConfig(),
    capture_deployment: str | None = None,
    gpu_queues: list[str] | None = None,
    shards_per_task: int = 1,
    rivalry: RivalryConfig | None = None,
    reconstruction: ReconstructionConfig | None = None,
) -> PipelineResult:
    """Capture (in-process, or fanned out to GPU workers), then rivalry and reconstruction."""
    logger = get_run_logger()
    # Children get the block names, never the secrets (their parameters are stored by Prefect).
    resolved = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    captures: list[dict[str, Any]] = []
    if capture_deployment:  # planned here once, to split the pending shards over the GPU queues
        plan = prepare_store(resolved)
        config = config.model_copy(update={"store": plan.config.store, "hook": plan.config.hook})
        if plan.pending:
            queues = gpu_queues or ["default"]
            groups = split_shards(plan.pending, len(queues))
            captures = fan_out_capture(config, capture_deployment, groups, queues[: len(groups)], shards_per_task)
    else:  # in this process: the capture flow plans (once) and captures what is pending
        config = config.model_copy(update={"store": capture_flow(config=config, shards_per_task=shards_per_task).store})
        resolved = resolved.model_copy(update={"store": config.store})
    lake = record_capture(resolved.ref, captures)
    common = {"store": config.store, "storage_options": config.storage_options}
    riv = rivalry_flow(config=(rivalry or RivalryConfig(**common)).model_copy(update=common))
    rec = reconstruction_flow(config=(reconstruction or ReconstructionConfig(**common)).model_copy(update=common))
    result = PipelineResult(config.store, lake.n_questions, lake.layers, riv, rec, captures)
    create_markdown_artifact(key="qsae-pipeline", markdown=result.to_markdown(), description=f"pipeline for {config.store}")
    logger.info(f"pipeline done: {config.store}")
    return result
