"""The capture flow: create/open the store, map a GPU task over chunk-aligned shards, report.

A rerun after a crash or cancel resumes: done shards are skipped and partly written ones
are rewritten whole. The task is tagged ``gpu`` so a Prefect tag concurrency limit
(``prefect concurrency-limit create gpu 1``) keeps one capture per GPU.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.logs import forward_qsae_logs
from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.capture import (
    CaptureConfig,
    CapturePlan,
    CaptureResult,
    CaptureStats,
    capture_shards,
    finish_capture,
    plan_capture,
)
from qsae.jobs.progress import Progress

forward_qsae_logs()  # the jobs' log lines in each run's logs


@task(name="prepare-store", cache_policy=NO_CACHE)
def prepare_store(config: CaptureConfig) -> CapturePlan:
    """Plan once: create or reopen the lake (refusing another config), resolve the store path and
    the hook, the prompt budget, the pending shards. The capture tasks take this plan."""
    logger = get_run_logger()
    plan = plan_capture(config)
    logger.info(f"{plan.config.store}: {len(plan.questions)} questions, {plan.lake.n_shards} shards, "
                f"{len(plan.pending)} pending")
    return plan


@task(name="capture-shards", tags=["gpu"], retries=2, retry_condition_fn=retry_unless_bad_input, retry_delay_seconds=10, cache_policy=NO_CACHE)
def capture_shards_task(plan: CapturePlan, shards: list[int]) -> CaptureStats:
    """Capture a group of shards; each is rewritten whole, so a retry is idempotent."""
    logger = get_run_logger()
    stats = capture_shards(plan, shards, progress=False)
    logger.info(f"shards {shards}: {stats.questions} questions, {stats.tokens_per_second:.0f} tokens/s, "
                f"{stats.bytes_written / 1e6:.1f} MB written")
    return stats


def group_shards(pending: list[int], shards_per_task: int) -> list[list[int]]:
    return [pending[i:i + shards_per_task] for i in range(0, len(pending), shards_per_task)]


@flow(name="qsae-capture", log_prints=True)
def capture_flow(config: CaptureConfig = CaptureConfig(), shards_per_task: int = 4,
                 shards: list[int] | None = None) -> CaptureResult:
    """Capture every pending shard of ``config.store`` (or only ``shards``, for scale-out)."""
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    plan = prepare_store(config)
    config, lake, pending = plan.config, plan.lake, plan.pending
    if shards is not None:
        pending = [s for s in pending if s in set(shards)]
    groups = group_shards(pending, shards_per_task)
    futures = capture_shards_task.map(unmapped(plan), groups) if groups else []
    results = []
    regions = [lake.shard_region(s) for s in pending]
    with Progress(sum(r.stop - r.start for r in regions), "capture (all pending shards)", "questions", bar=False,
                  logger=get_run_logger(), every=0.0) as overall:
        for future in as_completed(futures):  # the tasks take turns on the model: an ETA per finished group
            results.append(future.result())
            overall.update(results[-1].questions)
    result = finish_capture(plan, pending, results, record=shards is None)
    create_markdown_artifact(markdown=result.to_markdown(), key="qsae-capture", description=f"capture into {config.store}")
    return result
