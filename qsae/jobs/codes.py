"""A lake's codes meet the SAE that made them: jobs bring the lake's lineage and the SAE's files
together (the lake imports no SAE, the SAE no lake). ``load_sae_for`` is the one way every
analysis gets that SAE; ``decoder`` and ``reconstruct`` hand the accessor the narrow function it
needs to turn stored codes into x_hat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import xarray as xr

from qsae.errors import SAEFormatError
from qsae.lake.lineage import Lineage
from qsae.sae.formats import load_sae
from qsae.sae.metrics import decode_codes
from qsae.sae.model import SAE


def load_sae_for(lake: Any, layer: int, source: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """The SAE that made a lake's codes at ``layer`` (``lake``: its attributes, Dataset, Lake or
    ``Lineage``), loaded from ``source`` if the files moved, and checked to be that file (sha256)
    and width (``CodesMismatchError`` otherwise)."""
    lineage = lake if isinstance(lake, Lineage) else Lineage.of(lake)
    made = lineage.codes_sae(layer)
    path = source or made.source
    if not path:
        raise SAEFormatError("the lake records no sae_source; pass sae= to name the SAE file")
    sae = load_sae(path, layer=layer, k=made.k, device=device)
    made.check(sae.info.sha256, sae.d_sae, where=str(sae.info.source))
    return sae


def decoder(lake: Any, layer: int, source: str | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(rows, k) codes -> (rows, d_model) x_hat with the SAE that made the lake's codes (checked)."""
    sae = load_sae_for(lake, layer, source)
    return lambda idx, val: decode_codes(sae, idx, val)


def reconstruct(ds: xr.Dataset, layer: int | None = None, which: str = "completion",
                sae: str | None = None) -> xr.DataArray:
    """``ds.qsae.reconstruct`` with the lake's own SAE: x_hat of the stored residuals, lazy."""
    layer = ds.qsae._layer(layer)
    return ds.qsae.reconstruct(decoder(ds, layer, sae), layer=layer, which=which)
