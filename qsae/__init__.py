"""qsae: an activation data lake for sparse-autoencoder interpretability research.

The package is layered (see ``shared/DESIGN.md``); each subpackage says what it may import:

- ``qsae.lake``: the lake (schema, store, storage, writer, results, accessor, inspect, verify);
  numpy/zarr/xarray/fsspec only, torch only lazily where a check re-encodes.
- ``qsae.lm``: the language model (loading, hooks, sampling, datasets, fine-tuning); torch.
- ``qsae.sae``: the SAE (type, file formats, reconstruction metrics); torch.
- ``qsae.analysis``: the analyses' math (rivalry statistics, feature matching); numpy/scipy.
- ``qsae.jobs``: what flows and the CLI call (configs; plan, step and finish stages; figures).

``import qsae`` stays torch-free: it registers the ``ds.qsae`` xarray accessor and exposes the
notebook API below lazily (``qsae.run_capture`` imports torch only when touched).
"""

from __future__ import annotations

import importlib
from typing import Any

from qsae.lake import accessor as _accessor  # noqa: F401  (registers ``ds.qsae``; numpy/xarray only)
from qsae.version import __version__

_PUBLIC = {
    # the lake (torch-free)
    "open_lake": "qsae.lake.store", "QuestionLake": "qsae.lake.store", "TokenLake": "qsae.lake.store",
    "verify": "qsae.jobs.verify", "inspect_store": "qsae.lake.inspect",
    # jobs (each a config, torch-free, and a plain function a notebook can call; Prefect flows wrap them)
    "CaptureConfig": "qsae.jobs.configs", "SamplingConfig": "qsae.jobs.configs", "run_capture": "qsae.jobs.capture",
    "CollectConfig": "qsae.jobs.configs", "collect": "qsae.jobs.collect",
    "TrainConfig": "qsae.jobs.configs", "train_sae": "qsae.jobs.train",
    "RivalryConfig": "qsae.jobs.configs", "run_rivalry": "qsae.jobs.rivalry",
    "ReconstructionConfig": "qsae.jobs.configs", "run_reconstruction": "qsae.jobs.reconstruction",
    "CompareConfig": "qsae.jobs.configs", "run_compare": "qsae.jobs.compare",
    "reconstruct": "qsae.jobs.codes", "load_sae_for": "qsae.jobs.codes",
    "SteerConfig": "qsae.jobs.configs", "run_steer": "qsae.jobs.steer",
    # building blocks that need torch
    "load_model": "qsae.lm.models", "load_questions": "qsae.lm.datasets",
    "SAE": "qsae.sae.model", "load_sae": "qsae.sae.formats", "load_saes": "qsae.sae.formats",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (so ``import qsae`` needs no torch)."""
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'qsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
