"""The reconstruction flow: one mapped task per layer, then the metrics table, artifact, figure."""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.policies import retry_unless_bad_input
from flows.storage_blocks import resolve_secret_blocks
from qsae.jobs.reconstruction import (
    ReconstructionConfig,
    model_layer_metrics,
    offline_layer_metrics,
    run_reconstruction,
)
from qsae.lake.store import open_lake

TABLE_COLUMNS = ("layer", "n_tokens", "fve", "fve_legacy", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias",
                 "l0", "l1", "dead_features", "dense_features", "loss_recovered", "ce_clean", "ce_sae", "ce_zero",
                 "kl_sae", "kl_zero")


@task(name="reconstruction-offline", cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def offline_task(config: ReconstructionConfig, layer: int) -> tuple[dict[str, float], np.ndarray]:
    return offline_layer_metrics(config, layer)


@task(name="reconstruction-model-in-loop", tags=["gpu"], cache_policy=NO_CACHE, retries=1, retry_condition_fn=retry_unless_bad_input)
def model_task(config: ReconstructionConfig, layer: int, attrs: dict[str, Any]) -> dict[str, float]:
    return model_layer_metrics(config, layer, attrs)


@flow(name="qsae-reconstruction", log_prints=True)
def reconstruction_flow(config: ReconstructionConfig = ReconstructionConfig()) -> dict[str, Any]:
    logger = get_run_logger()
    config = config.model_copy(update={"storage_options": resolve_secret_blocks(config.storage_options)})
    ds = open_lake(config.store, storage_options=config.storage_options)
    layers = config.layers or [int(x) for x in ds.layer.values]
    offline = offline_task.map(unmapped(config), layers)
    computed = {}
    model_futures = model_task.map(unmapped(config), layers, unmapped(dict(ds.attrs))) if config.model_in_loop else None
    for i, (layer, fut) in enumerate(zip(layers, offline)):
        metrics, density = fut.result()
        if model_futures is not None:
            metrics = {**metrics, **model_futures[i].result()}
        computed[layer] = (metrics, density)
    result = run_reconstruction(config, logger.info, computed=computed)
    t = result.table
    rows = [{c: (round(float(t[c].sel(layer=layer)), 5) if c != "layer" else int(layer)) for c in TABLE_COLUMNS
             if c == "layer" or c in t} for layer in t.layer.values]
    create_table_artifact(key="qsae-reconstruction", table=rows, description=f"SAE reconstruction metrics, {config.store}")
    create_markdown_artifact(key="qsae-reconstruction-figure", markdown=(
        f"# Reconstruction metrics\n\nstore `{config.store}`, group `reconstruction`\n\nfigure: `{result.figure}`"))
    return {"rows": rows, "figure": result.figure}
