"""Flows for collecting token activations and training an SAE on them."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.logs import forward_qsae_logs
from flows.policies import retry_unless_bad_input
from qsae.jobs.collect import CollectConfig, CollectResult, collect
from qsae.jobs.train import TrainConfig, TrainResult, train_sae

forward_qsae_logs()  # the jobs' log lines in each run's logs


@task(name="collect-tokens", tags=["gpu"], retries=1, retry_condition_fn=retry_unless_bad_input, retry_delay_seconds=10, cache_policy=NO_CACHE)
def collect_task(config: CollectConfig) -> CollectResult:
    return collect(config)


@task(name="train-sae", tags=["gpu"], retries=1, retry_condition_fn=retry_unless_bad_input, retry_delay_seconds=10, cache_policy=NO_CACHE)
def train_task(config: TrainConfig) -> TrainResult:
    """Train (resuming from the last checkpoint on a retry) and export the SAE."""
    logger = get_run_logger()
    return train_sae(config, on_log=lambda e: logger.info(
        f"step {e['step']}: loss {e['loss']:.4g} mse {e['mse']:.4g} fve {e['fve']:.3f} l0 {e['l0']:.1f} dead {e['dead']}"))


@flow(name="qsae-collect", log_prints=True)
def collect_flow(config: CollectConfig = CollectConfig()) -> CollectResult:
    return collect_task(config)


@flow(name="qsae-train", log_prints=True)
def train_flow(config: TrainConfig = TrainConfig(), collect_config: CollectConfig | None = None) -> TrainResult:
    """Optionally collect first, then train; publishes the final metrics as an artifact."""
    if collect_config is not None:
        collect_task(collect_config)
    result = train_task(config.model_copy(update={"resume": True}))
    create_markdown_artifact(key="qsae-train", markdown=result.to_markdown())
    return result
