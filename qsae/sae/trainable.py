"""The trainable twin of ``qsae.sae.model.SAE``, in the trainer's units, and its way back.

It reuses the frozen SAE's encoder (``encoder_pre`` with ``b_pre`` tied to ``b_dec``, as
SAELens' ``apply_b_dec_to_input``) and nonlinearity (``activate``); what is its own is the
training parametrisation: inputs divided by one scalar (``InputScaler``, so that
E||x / s||^2 = d_model) and unit-norm decoder rows. ``to_inference`` folds the scale back
into the weights (a frozen ``SAE`` on raw activations), ``save_saelens`` writes that as a
SAELens folder, ``load_from`` starts from an existing SAE (the reverse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from qsae.sae.model import SAE, SAEInfo, activate, encoder_pre


@dataclass(frozen=True)
class InputScaler:
    """Inputs divided by one scalar so that E||x / scale||^2 = d_model (over a fitting sample)."""

    scale: float

    @classmethod
    def fit(cls, rows: np.ndarray) -> InputScaler:
        """The scale of a sample of rows (n, d_model), computed in float64."""
        return cls(float(np.sqrt(np.mean(np.sum(rows.astype(np.float64) ** 2, axis=1)) / rows.shape[1])))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale

    def unscale(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


class ForwardOutput(NamedTuple):
    """One forward pass in the trainer's units: the reconstruction, the codes, the pre-activations."""

    x_hat: torch.Tensor
    codes: torch.Tensor
    pre: torch.Tensor


class TrainableSAE(torch.nn.Module):
    """TopK or ReLU SAE with unit-norm decoder rows, trained on scaled inputs."""

    def __init__(self, d_model: int, d_sae: int, architecture: str, k: int, generator: torch.Generator):
        super().__init__()
        w = torch.randn(d_sae, d_model, generator=generator)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))
        self.architecture, self.k = architecture, k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return encoder_pre(x, self.W_enc, self.b_enc, self.b_dec)

    def codes(self, pre: torch.Tensor) -> torch.Tensor:
        return activate(pre, self.architecture, self.k)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        pre = self.pre(x)
        z = self.codes(pre)
        return ForwardOutput(z @ self.W_dec + self.b_dec, z, pre)

    @torch.no_grad()
    def keep_decoder_unit_norm(self) -> None:
        """Remove the gradient's component along each decoder row, then renormalise the rows."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    # ------------------------------------------------------------ to and from raw units
    @torch.no_grad()
    def raw_weights(self, scaler: InputScaler) -> dict[str, torch.Tensor]:
        """The weights on raw activations: the codes are the same, x_hat is scaled back."""
        s = scaler.scale
        return {"W_enc": (self.W_enc / s).detach().cpu().contiguous(), "b_enc": self.b_enc.detach().cpu().contiguous(),
                "W_dec": (self.W_dec * s).detach().cpu().contiguous(),
                "b_dec": (self.b_dec * s).detach().cpu().contiguous()}

    def to_inference(self, scaler: InputScaler, hook: str = "resid_post", layer: int | None = None,
                     source: str = "") -> SAE:
        """A frozen ``SAE`` on raw activations that computes this SAE (its ``b_pre`` is ``b_dec``)."""
        w = self.raw_weights(scaler)
        d_sae, d_model = w["W_dec"].shape
        info = SAEInfo(d_model, d_sae, "topk" if self.architecture == "topk" else "relu",  # type: ignore[arg-type]
                       self.k if self.architecture == "topk" else None, hook, layer, source, "", "qsae-trainable")  # type: ignore[arg-type]
        return SAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], info, b_pre=w["b_dec"])

    def save_saelens(self, out: Path, scaler: InputScaler, lineage: dict[str, Any], training: dict[str, Any]) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens format, raw-activation units);
        ``training`` is recorded under ``qsae_training`` with the input scale."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        weights = self.raw_weights(scaler)
        save_file(weights, str(out / "sae_weights.safetensors"))
        layer, hook = lineage.get("layer"), lineage.get("hook", "resid_post")
        cfg_json = {
            "architecture": "topk" if self.architecture == "topk" else "standard",
            "d_in": int(weights["W_enc"].shape[0]),
            "d_sae": int(weights["W_enc"].shape[1]),
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": lineage.get("model"),
                "hook_name": f"blocks.{layer}.hook_{hook}" if layer is not None else None,
                "hook_layer": layer,
                "context_size": lineage.get("context_length"),
                "dataset_path": lineage.get("store"),
            },
            "qsae_training": {**training, "input_scale": scaler.scale},
        }
        if self.architecture == "topk":
            cfg_json["k"] = self.k
        (out / "cfg.json").write_text(json.dumps(cfg_json, indent=2))
        return out

    @torch.no_grad()
    def load_from(self, src: SAE, scaler: InputScaler) -> None:
        """Start from an SAE (raw-activation units), in this parametrisation.

        The source encodes ``(x - b_pre) @ W_enc + b_enc``; this one subtracts ``b_dec``, so
        ``(b_dec - b_pre) @ W_enc`` is folded into ``b_enc`` (a Qwen-Scope SAE has b_pre = 0
        and b_dec != 0): the pre-activations are the source's exactly. Decoder rows are
        renormalised to unit length; for a ReLU SAE each latent's encoder column and bias are
        multiplied by its scaled decoder row's norm, so the function is unchanged; a TopK
        SAE's ranking would change under that, so there the codes stay the source's and x_hat
        changes by the renormalisation only (not at all for an SAE this class exported).
        """
        if (src.d_model, src.d_sae) != tuple(self.W_enc.shape):
            raise ValueError(f"{src.info.source} is {src.d_model} x {src.d_sae}, the trainer needs "
                             f"{tuple(self.W_enc.shape)}")
        scale = scaler.scale
        W_dec = src.W_dec.float()
        norms = W_dec.norm(dim=-1)  # the scaled decoder W_dec / scale has row norms norms / scale
        W_enc, b_dec = src.W_enc.float(), src.b_dec.float()
        b_enc = src.b_enc.float() + (b_dec - src.b_pre.float()) @ W_enc
        if self.architecture == "relu":
            W_enc, b_enc = W_enc * (norms / scale), b_enc * (norms / scale)
        self.W_dec.copy_(W_dec / norms[:, None])
        self.W_enc.copy_(W_enc * scale)
        self.b_enc.copy_(b_enc)
        self.b_dec.copy_(b_dec / scale)


def auxk_loss(err: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Gao et al.'s AuxK: the error ``err`` modelled by the top ``aux_k`` dead latents' codes
    (through the decoder, no bias), its squared error over the batch divided by the error's
    own total variance ``||err - mean(err)||^2`` (as sparsify does)."""
    kk = min(aux_k, int(dead.sum()))
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(kk, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ W_dec
    total_var = (err - err.mean(0)).pow(2).sum()
    return (e_hat - err).pow(2).sum() / total_var.clamp_min(torch.finfo(err.dtype).tiny)
