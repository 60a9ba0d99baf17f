"""SAE reconstruction metrics (SAEBench "core" style): offline from a lake, and with the model.

Offline, per layer, over the stored residuals and their stored TopK codes (x_hat decoded
with the SAE file the lake's lineage names, its sha256 checked), accumulated in float64:

* ``mse``            mean over tokens and dims of (x - x_hat)^2
* ``mse_per_token``  mean over tokens of ||x - x_hat||^2 (SAELens' corrected "mse", PR #711)
* ``fve``            1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2, the mean taken over the
                     evaluated tokens (the centred, conventional form; SAELens #659 / PR #665)
* ``fve_legacy``     mean_t [1 - ||x_t - x_hat_t||^2 / ||x_t - mean(x)||^2] over tokens not equal to the
                     mean (those have no ratio; counted in ``fve_legacy_tokens_left_out``, never a
                     NaN for the whole layer): the per-token ratio that
                     SAEBench's paper used (SAEBench #76); SAEBench centred on each batch's mean,
                     we centre on the mean over all evaluated tokens so the number does not depend
                     on batching
* ``cossim``         mean_t cos(x_t, x_hat_t);  ``l2_ratio`` mean_t ||x_hat_t|| / ||x_t||
* ``relative_reconstruction_bias``  E||x_hat||^2 / E[x . x_hat] (1 = no shrinkage)
* ``l0``, ``l1``     mean number / sum of active codes per token
* feature density    fraction of tokens on which each feature fires; ``dead`` never fire,
                     ``dense`` fire on more than 10% of tokens

Rows whose residual is not finite (``resid_nonfinite`` > 0) are left out and counted.
With the model in the loop: next-token cross-entropy clean, with the layer's residual
replaced by its SAE reconstruction, and zero-ablated; loss recovered = (CE_zero - CE_sae) /
(CE_zero - CE_clean) (SAEBench's ``ce_loss_score``); KL(clean || spliced) for both and
SAEBench's ``kl_div_score`` = (KL_zero - KL_sae) / KL_zero. The SAE is spliced in at its own
hook (the residual after the layer, or the layer's MLP output: zero-ablating an MLP-output
SAE ablates the MLP). BOS and padding positions are neither spliced nor scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from qsae.sae.model import SAE

log = logging.getLogger("qsae.sae.metrics")
DENSE_THRESHOLD = 0.1


@dataclass
class ReconAccumulator:
    """Float64 running sums for the offline metrics (two passes: ``mean`` must be set first)."""

    d_sae: int
    mean: np.ndarray
    n: int = 0
    sse: float = 0.0
    total_ss: float = 0.0
    legacy: float = 0.0
    legacy_n: int = 0  # tokens with a defined per-token ratio (||x_t - mean|| > 0)
    cos: float = 0.0
    l2_ratio: float = 0.0
    xhat_sq: float = 0.0
    dot: float = 0.0
    l0: float = 0.0
    l1: float = 0.0
    fired: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.fired is None:
            self.fired = np.zeros(self.d_sae, dtype=np.int64)

    def add(self, x: np.ndarray, x_hat: np.ndarray, idx: np.ndarray, val: np.ndarray) -> None:
        x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
        err = ((x - x_hat) ** 2).sum(-1)
        centred = ((x - self.mean) ** 2).sum(-1)
        nx, nxh = np.linalg.norm(x, axis=-1), np.linalg.norm(x_hat, axis=-1)
        safe_nx = np.where(nx > 0, nx, 1.0)
        self.n += x.shape[0]
        self.sse += float(err.sum())
        self.total_ss += float(centred.sum())
        ok = centred > 0  # a token equal to the mean has no per-token ratio: left out and counted
        self.legacy += float((1 - err[ok] / centred[ok]).sum())
        self.legacy_n += int(ok.sum())
        self.cos += float(((x * x_hat).sum(-1) / (safe_nx * np.where(nxh > 0, nxh, 1.0))).sum())
        self.l2_ratio += float((nxh / safe_nx).sum())
        self.xhat_sq += float((nxh**2).sum())
        self.dot += float((x * x_hat).sum())
        active = val != 0  # raw (Qwen-Scope) TopK codes may be negative: still active
        self.l0 += float(active.sum())
        self.l1 += float(np.abs(val).sum())
        np.add.at(self.fired, idx[active].astype(np.int64), 1)

    def metrics(self, d_model: int) -> dict[str, float]:
        n = max(self.n, 1)
        density = self.fired / n
        return {
            "n_tokens": self.n,
            "mse": self.sse / (n * d_model),
            "mse_per_token": self.sse / n,
            "fve": 1 - self.sse / self.total_ss if self.total_ss > 0 else float("nan"),
            "fve_legacy": self.legacy / self.legacy_n if self.legacy_n else float("nan"),
            "fve_legacy_tokens_left_out": self.n - self.legacy_n,
            "cossim": self.cos / n,
            "l2_ratio": self.l2_ratio / n,
            "relative_reconstruction_bias": self.xhat_sq / self.dot if self.dot else float("nan"),
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "dead_features": int((self.fired == 0).sum()),
            "dense_features": int((density > DENSE_THRESHOLD).sum()),
            "frac_alive": float((self.fired > 0).mean()),
        }

    @property
    def density(self) -> np.ndarray:
        return self.fired / max(self.n, 1)


def decode_codes(sae: SAE, idx: np.ndarray, val: np.ndarray, batch: int = 8192) -> np.ndarray:
    """x_hat from stored sparse codes (float32), never densifying the codes."""
    out = np.empty((idx.shape[0], sae.d_model), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, idx.shape[0], batch):
            ii = torch.from_numpy(idx[i:i + batch].astype(np.int64)).to(sae.W_dec.device)
            vv = torch.from_numpy(val[i:i + batch].astype(np.float32)).to(sae.W_dec.device)
            out[i:i + batch] = sae.decode_sparse(ii, vv).float().cpu().numpy()
    return out


# ----------------------------------------------------------------- model in loop
@dataclass
class LossRecovered:
    ce_clean: float
    ce_sae: float
    ce_zero: float
    kl_sae: float
    kl_zero: float
    n_tokens: int

    @property
    def loss_recovered(self) -> float:
        denom = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_sae) / denom if denom else float("nan")

    @property
    def kl_div_score(self) -> float:
        """SAEBench's ``kl_div_score``: (KL_zero - KL_sae) / KL_zero (1 = the SAE changes nothing)."""
        return (self.kl_zero - self.kl_sae) / self.kl_zero if self.kl_zero else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "loss_recovered": self.loss_recovered, "kl_div_score": self.kl_div_score}


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


class LossAccumulator:
    """CE clean / SAE-spliced / zero-ablated and the KLs from clean, summed over the scored
    positions of many batches (the model run with the splice is the job's: SAEBench's
    ``ce_loss_score`` and ``kl_div_score`` from whatever runs the model)."""

    def __init__(self) -> None:
        self.sums = dict(clean=0.0, sae=0.0, zero=0.0, kl_sae=0.0, kl_zero=0.0)
        self.n_tok = 0

    def add(self, clean: torch.Tensor, spliced: torch.Tensor, zeroed: torch.Tensor, targets: torch.Tensor,
            scored: torch.Tensor) -> None:
        """One batch: (n, T, V) logits of each run for predicting ``targets`` (n, T); ``scored``
        (n, T) weights the positions counted (1.0 or 0.0)."""
        lp_clean = torch.log_softmax(clean.float(), -1)
        for name, logits in (("sae", spliced), ("zero", zeroed)):
            lp = torch.log_softmax(logits.float(), -1)
            self.sums[f"kl_{name}"] += float(((lp_clean.exp() * (lp_clean - lp)).sum(-1) * scored).sum())
            self.sums[name] += float((_token_losses(logits, targets) * scored).sum())
        self.sums["clean"] += float((_token_losses(clean, targets) * scored).sum())
        self.n_tok += int(scored.sum())

    def result(self) -> LossRecovered:
        n, s = max(self.n_tok, 1), self.sums
        return LossRecovered(s["clean"] / n, s["sae"] / n, s["zero"] / n, s["kl_sae"] / n, s["kl_zero"] / n, self.n_tok)


Positions = Literal["completion", "prompt", "both"]
