"""The device side of writing activations: rows of a tensor to the lake dtype, on its device."""

from __future__ import annotations

import torch

FP16_MAX = 65504.0  # float16's largest finite value (numpy.finfo(float16).max); the lake's schema says the same


def to_lake_dtype(x: torch.Tensor, resid_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored, norm, overflow count, non-finite count) of rows of x, computed on x's device.

    float16 cannot hold |x| > 65504: such values are clipped to +-65504 and counted per row,
    never turned into inf. Non-finite values the model produced are kept and counted.
    """
    xf = x.float()
    finite = torch.isfinite(xf)
    nonfinite = (~finite).sum(-1)
    norm = torch.linalg.vector_norm(torch.where(finite, xf, 0.0), dim=-1)
    norm = torch.where(nonfinite > 0, torch.full_like(norm, float("nan")), norm)
    if resid_dtype == "float16":
        over = finite & (xf.abs() > FP16_MAX)
        stored = torch.where(over, xf.clamp(-FP16_MAX, FP16_MAX), xf).to(torch.float16)
        return stored, norm, over.sum(-1), nonfinite
    return xf, norm, torch.zeros_like(nonfinite), nonfinite
