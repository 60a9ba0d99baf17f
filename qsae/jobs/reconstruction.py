"""Run the reconstruction study on a question lake; write a metrics table and figure into it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field

from qsae.errors import LayerError
from qsae.lake.results import lineage_of, save_figure, write_result_group
from qsae.lake.store import open_lake
from qsae.sae.metrics import ReconAccumulator, decode_codes, loss_recovered, sae_for_lake_layer

log = logging.getLogger("qsae.sae.metrics")
RESULT_GROUP = "reconstruction"


class ReconstructionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = "storage/lakes/demo.zarr"
    storage_options: dict[str, Any] | None = None
    layers: list[int] | None = Field(None, description="default: every captured layer")
    sae: str | None = Field(None, description="SAE source if it moved since capture (hash still checked)")
    positions: Literal["completion", "prompt", "both"] = "both"
    block_questions: int = Field(256, ge=1)
    model_in_loop: bool = Field(False, description="also CE loss recovered and KL with the model")
    model: str | None = Field(None, description="default: the lake's model_path")
    text_dataset: str = Field("wiki-demo", description="documents for the model-in-the-loop metrics")
    context_length: int = Field(128, ge=2)
    max_tokens: int = Field(8192, ge=1, description="tokens scored with the model in the loop")
    batch_windows: int = Field(8, ge=1)
    device: str = "cpu"
    dtype: str = "float32"
    dask_address: str | None = Field(None, description="offline layers on dask: 'local' or a scheduler address")


def _rows(ds: xr.Dataset, layer: int, block: slice, positions: str):
    """(x, idx, val) rows of one question block: done questions, finite residuals only."""
    sel = ds.isel(question=block)
    done = sel.done.values
    parts = []
    if positions in ("completion", "both"):
        v = sel[["resid", "codes_idx", "codes_val", "resid_nonfinite"]].sel(layer=layer).load()
        ok = done[:, None] & (v.resid_nonfinite.values == 0)
        parts.append((v.resid.values[ok], v.codes_idx.values[ok], v.codes_val.values[ok], int((done[:, None] & ~ok).sum())))
    if positions in ("prompt", "both"):
        v = sel[["resid_prompt", "prompt_codes_idx", "prompt_codes_val", "resid_prompt_nonfinite"]].sel(layer=layer).load()
        ok = done & (v.resid_prompt_nonfinite.values == 0)
        parts.append((v.resid_prompt.values[ok], v.prompt_codes_idx.values[ok], v.prompt_codes_val.values[ok],
                      int((done & ~ok).sum())))
    x = np.concatenate([p[0] for p in parts]).astype(np.float64)
    return x, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]), sum(p[3] for p in parts)


def blocks_of(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def offline_layer_metrics(cfg: ReconstructionConfig, layer: int) -> tuple[dict[str, float], np.ndarray]:
    """Offline metrics and feature density for one layer (two passes over the lake)."""
    ds = open_lake(cfg.store, storage_options=cfg.storage_options)
    if "codes_idx" not in ds:
        raise ValueError(f"{cfg.store} holds no SAE codes")
    sae = sae_for_lake_layer(dict(ds.attrs), layer, cfg.sae, cfg.device)
    blocks = blocks_of(ds.sizes["question"], cfg.block_questions)
    total, n, skipped = np.zeros(ds.sizes["d_model"]), 0, 0
    for b in blocks:  # pass 1: the mean over evaluated tokens
        x, _, _, bad = _rows(ds, layer, b, cfg.positions)
        total += x.sum(0)
        n += x.shape[0]
        skipped += bad
    if n == 0:
        raise ValueError(f"layer {layer}: no finished questions with finite residuals to evaluate")
    acc = ReconAccumulator(sae.d_sae, total / n)
    for b in blocks:  # pass 2: everything else
        x, idx, val, _ = _rows(ds, layer, b, cfg.positions)
        acc.add(x, decode_codes(sae, idx, val), idx, val)
    out = acc.metrics(ds.sizes["d_model"])
    out["nonfinite_rows_left_out"] = skipped
    out["layer"] = layer
    return out, acc.density.astype(np.float32)


def text_windows(model_lm, cfg: ReconstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of the text dataset (BOS first) and the mask of positions to splice and score."""
    from qsae.jobs.collect import CollectConfig, make_windows
    from qsae.lm.datasets import load_texts

    ccfg = CollectConfig(dataset=cfg.text_dataset, context_length=cfg.context_length, max_tokens=cfg.max_tokens,
                         bos="prepend")
    win = make_windows(load_texts(cfg.text_dataset), model_lm.tokenizer, ccfg)
    keep = np.concatenate([np.zeros((win.inputs.shape[0], 1), bool), ~win.special], axis=1)
    return torch.from_numpy(win.inputs), torch.from_numpy(keep)


def model_layer_metrics(cfg: ReconstructionConfig, layer: int, attrs: dict[str, Any], lm=None) -> dict[str, float]:
    """CE loss recovered and KL for one layer with the model in the loop."""
    from qsae.lm.models import load_model

    lm = lm or load_model(cfg.model or attrs.get("model_path") or attrs["model"], device=cfg.device, dtype=cfg.dtype)
    sae = sae_for_lake_layer(attrs, layer, cfg.sae, str(lm.device))
    windows, keep = text_windows(lm, cfg)
    res = loss_recovered(lm.model, sae, layer, windows, keep, batch=cfg.batch_windows)
    return res.as_dict()


@dataclass
class ReconstructionResult:
    table: xr.Dataset
    figure: str | None


def run_reconstruction(cfg: ReconstructionConfig, log_fn: Callable[[str], None] = log.info,
                       computed: dict[int, tuple[dict[str, float], np.ndarray]] | None = None) -> ReconstructionResult:
    """Metrics for every requested layer; ``computed`` takes results of mapped tasks."""
    ds = open_lake(cfg.store, storage_options=cfg.storage_options)
    attrs = dict(ds.attrs)
    layers = cfg.layers or [int(x) for x in ds.layer.values]
    missing = [layer for layer in layers if layer not in set(int(x) for x in ds.layer.values)]
    if missing:
        raise LayerError(f"layers {missing} are not in the lake (layers {list(ds.layer.values)})")
    from qsae.jobs.dask_compute import map_blocks

    todo = [layer for layer in layers if layer not in (computed or {})]
    offline = dict(zip(todo, map_blocks(offline_layer_metrics, [(cfg, layer) for layer in todo], cfg.dask_address)))
    rows, densities = [], []
    lm = None
    for layer in layers:
        metrics, density = (computed or {}).get(layer) or offline[layer]
        if cfg.model_in_loop and "loss_recovered" not in metrics:
            if lm is None:
                from qsae.lm.models import load_model

                lm = load_model(cfg.model or attrs.get("model_path") or attrs["model"], device=cfg.device, dtype=cfg.dtype)
            metrics = {**metrics, **model_layer_metrics(cfg, layer, attrs, lm)}
        log_fn(f"layer {layer}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                if k in ("fve", "fve_legacy", "cossim", "l0", "dead_features", "loss_recovered")))
        rows.append(metrics)
        densities.append(density)
    names = [k for k in rows[0] if k != "layer"]
    table = xr.Dataset({k: ("layer", np.array([r.get(k, np.nan) for r in rows], dtype=float)) for k in names},
                       coords={"layer": layers})
    table["feature_density"] = (("layer", "feature"), np.stack(densities))
    write_result_group(cfg.store, RESULT_GROUP, table,
                       {"kind": "reconstruction", "params": cfg.model_dump(), "lineage": lineage_of(attrs),
                        "definitions": "see qsae.sae.metrics module docstring"}, cfg.storage_options)
    fig_url = save_figure(reconstruction_figure(table), cfg.store, f"{RESULT_GROUP}/figure.png", cfg.storage_options)
    return ReconstructionResult(table, fig_url)


def reconstruction_figure(table: xr.Dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    layers = table.layer.values
    for name in ("fve", "fve_legacy", "cossim", "loss_recovered"):
        if name in table and np.isfinite(table[name].values).any():
            ax1.plot(layers, table[name].values, marker="o", label=name)
    ax1.set_xlabel("layer")
    ax1.set_xticks(layers)
    ax1.set_xlim(layers.min() - 1, layers.max() + 1)
    low = float(np.nanmin([table[n].values.min() for n in ("fve", "cossim") if n in table]))
    ax1.set_ylim(min(0.0, low) - 0.02, 1.02)
    ax1.legend(fontsize=8, loc="lower left")
    ax1.set_title("L0 by layer: " + ", ".join(f"{int(la)}: {v:.0f}" for la, v in zip(layers, table.l0.values)), fontsize=9)
    for layer in layers:
        d = table.feature_density.sel(layer=layer).values
        live = d[d > 0]
        if live.size:
            ax2.hist(np.log10(live), bins=40, histtype="step", label=f"layer {layer} ({int((d == 0).sum())} dead)")
    ax2.axvline(np.log10(0.1), color="crimson", ls="--", lw=1, label="dense (10%)")
    ax2.set_xlabel("log10 feature density (fraction of tokens)")
    ax2.set_ylabel("features")
    ax2.legend(fontsize=8)
    fig.suptitle("SAE reconstruction metrics", fontsize=10)
    return fig
