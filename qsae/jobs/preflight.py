"""Checks that need nothing loaded, run before a Prefect server starts or a model loads.

Each job's plan makes these checks too (a deployment run meets them first thing); the CLI
runs them before it starts anything, so a mistyped path, a dataset column or a layer the
lake does not have is said in about a second, in the same words either way. Torch-free.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

from qsae.errors import LayerError
from qsae.jobs.configs import (
    CaptureConfig,
    CollectConfig,
    CompareConfig,
    FeaturesConfig,
    ReconstructionConfig,
    RivalryConfig,
    SteerConfig,
    TrainConfig,
)
from qsae.lake.storage import StoreRef
from qsae.lake.store import Lake, QuestionLake, TokenLake


@singledispatch
def preflight(cfg: Any) -> None:
    """Raise the ``QsaeError`` a run of ``cfg`` would meet later, if a cheap look finds it."""


def check_model_layers(model: str, layers: list[int], revision: str | None = None) -> None:
    """The model can be found (folder, cache or embedded) and has these layers (its config.json)."""
    from qsae.lm.locate import model_config, n_layers

    config = model_config(model, revision)
    n = n_layers(config) if config else None
    bad = [layer for layer in layers if n is not None and not 0 <= layer < n]
    if bad:
        raise LayerError(f"layers {bad} out of range: {model} has {n} layers (0..{n - 1})")


def lake_layers(ref: StoreRef, layers: list[int] | None, kind: type[Lake] = Lake, what: str = "") -> list[int]:
    """Open the lake (its schema and kind checked), refuse layers it lacks and, for an analysis
    (``what``), a lake with nothing captured; the layers to use."""
    from qsae.lake.results import lake_state

    lake = kind.open(ref)
    if what:
        lake_state(lake).require(ref.url, what)
    have = lake.layers
    missing = [layer for layer in layers or [] if layer not in have]
    if missing:
        raise LayerError(f"layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                         f"{'are' if len(missing) > 1 else 'is'} not in the lake {ref.url} (layers {have})")
    return list(layers or have)


@preflight.register
def _capture(cfg: CaptureConfig) -> None:
    from qsae.lake.store import store_exists
    from qsae.lm.datasets import load_questions
    from qsae.sae.locate import check_sae_layers

    load_questions(cfg.dataset, on_error=cfg.on_bad_row, limit=cfg.limit, split=cfg.dataset_split)
    check_model_layers(cfg.model, cfg.layers, cfg.model_revision)
    if cfg.sae is not None:
        check_sae_layers(cfg.sae, cfg.layers)
    store_exists(cfg.ref)  # reachable (a dead endpoint or a missing bucket is said now)


@preflight.register
def _collect(cfg: CollectConfig) -> None:
    from qsae.lm.datasets import load_texts

    load_texts(cfg.dataset, text_field=cfg.text_field, split=cfg.dataset_split, limit=1)
    check_model_layers(cfg.model, cfg.layers, cfg.model_revision)


@preflight.register
def _rivalry(cfg: RivalryConfig) -> None:
    lake_layers(cfg.ref, cfg.layers, kind=QuestionLake, what="analyse")


@preflight.register
def _features(cfg: FeaturesConfig) -> None:
    from qsae.sae.locate import sae_path

    lake_layers(cfg.ref, cfg.layers, what="show")
    if cfg.sae is not None:
        sae_path(cfg.sae)


@preflight.register
def _reconstruction(cfg: ReconstructionConfig) -> None:
    from qsae.sae.locate import sae_path

    lake_layers(cfg.ref, cfg.layers, what="reconstruct")
    if cfg.sae is not None:
        sae_path(cfg.sae)
    if cfg.model_in_loop and cfg.model is not None:
        check_model_layers(cfg.model, cfg.layers or [])


@preflight.register
def _train(cfg: TrainConfig) -> None:
    from qsae.sae.locate import sae_path

    lake_layers(cfg.ref, [cfg.layer] if cfg.layer is not None else None, kind=TokenLake, what="train on")
    if cfg.init_from:
        sae_path(cfg.init_from)


@preflight.register
def _compare(cfg: CompareConfig) -> None:
    from qsae.sae.locate import check_sae_layers

    for source in (cfg.base_sae, cfg.finetuned_sae):
        if cfg.layer is not None:
            check_sae_layers(source, [cfg.layer])
        else:
            from qsae.sae.locate import sae_path

            sae_path(source)
    for url in (cfg.base_lake, cfg.finetuned_lake):
        if url is not None:
            lake_layers(cfg.lake_ref(url), [cfg.layer] if cfg.layer is not None else None, kind=QuestionLake,
                        what="compare")


@preflight.register
def _steer(cfg: SteerConfig) -> None:
    """The lake, its proven rivalry result and the layer in it, an ambiguous question, the model
    and the SAE on this machine: all said before a model loads."""
    from qsae.errors import DatasetError, LayerError
    from qsae.lake.results import lake_state, read_result_group
    from qsae.sae.locate import check_sae_layers

    lake = QuestionLake.open(cfg.ref)
    state = lake_state(lake).require(cfg.ref.url, "steer")
    hint = f"qsae rivalry {cfg.store}"
    by_layer = read_result_group(cfg.ref, "rivalry/paper", state, rerun=hint)
    layers = [int(x) for x in by_layer.layer.values]
    if cfg.layer is not None and cfg.layer not in layers:
        raise LayerError(f"layer {cfg.layer} has no rivalry result in {cfg.ref.url} (it has layers {layers}): run "
                         f"`{hint} --layer {cfg.layer}` first")
    for layer in [cfg.layer] if cfg.layer is not None else layers:
        group = read_result_group(cfg.ref, f"rivalry/layer_{layer}/paper", state, rerun=hint).group.values
        if not (group == "ambiguous").any():
            raise DatasetError(f"the rivalry result at layer {layer} has no ambiguous question: nothing to steer")
    attrs = lake.attrs
    model = cfg.model or attrs.get("model_path") or attrs.get("model")
    check_model_layers(str(model), [cfg.layer] if cfg.layer is not None else layers)
    source = cfg.sae or attrs.get("sae_source")
    if not source:
        raise DatasetError(f"{cfg.ref.url} records no SAE (captured without one): nothing to steer along")
    check_sae_layers(source, [cfg.layer] if cfg.layer is not None else layers)


__all__ = ["preflight", "check_model_layers", "lake_layers"]
