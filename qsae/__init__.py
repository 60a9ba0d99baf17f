"""qsae: an activation data lake for sparse-autoencoder interpretability research.

The lake code (``qsae.lake``, ``qsae.schema``) needs numpy/zarr/xarray only; the model,
hook and SAE code needs torch and is imported on demand.
"""

__version__ = "0.1.0"

from . import accessor as _accessor  # noqa: E402,F401  (registers ``ds.qsae``; numpy/xarray only)
