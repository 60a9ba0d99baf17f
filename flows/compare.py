"""The compare flow: match two SAEs' features, measure firing shifts, publish the results."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.logs import forward_qsae_logs
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.compare import CompareConfig, CompareResult, run_compare

forward_qsae_logs()  # the jobs' log lines in each run's logs


@flow(name="qsae-compare", log_prints=True)
def compare_flow(config: CompareConfig) -> CompareResult:
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    result = run_compare(config)
    create_markdown_artifact(key="qsae-compare", markdown=result.to_markdown(), description="SAE feature comparison")
    return result
