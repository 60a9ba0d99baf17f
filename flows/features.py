"""The features flow: a thin wrapper over ``qsae.jobs.features.run_features`` with an artifact
that links each layer's dashboard index."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.logs import forward_qsae_logs
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.features import FeaturesConfig, FeaturesResult, run_features

forward_qsae_logs()  # the jobs' log lines in each run's logs


@flow(name="qsae-features", log_prints=True)
def features_flow(config: FeaturesConfig = FeaturesConfig()) -> FeaturesResult:
    """Build the feature dashboards (and the Neuronpedia export when asked) of a lake."""
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    result = run_features(config)
    create_markdown_artifact(key="qsae-features", markdown=result.to_markdown(),
                             description="feature dashboards: one index per layer")
    return result
