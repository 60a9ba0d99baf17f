"""One SAE type for every supported format: TopK or ReLU encoder, linear decoder.

Orientation follows SAELens: ``W_enc (d_model, d_sae)``, ``W_dec (d_sae, d_model)``.
Encoding is ``pre = (x - b_pre) @ W_enc + b_enc``; TopK keeps the k largest pre-activations
(then ReLU as SAELens does, or as they are for Qwen-Scope, whose official code applies
no nonlinearity after the top-k), ReLU keeps all positive ones. Decoding is
``x_hat = z @ W_dec + b_dec``. ``b_pre`` is the 9B release's ``bias`` or SAELens'
``b_dec`` when ``apply_b_dec_to_input``; zero for Qwen-Scope.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from qsae.errors import SAEFormatError, SAEModelMismatchError

Activation = Literal["topk", "relu"]
HookPoint = Literal["resid_post", "mlp_out"]


@dataclass(frozen=True)
class SAEInfo:
    """What an SAE is and where it came from (the lake records this as lineage)."""

    d_model: int
    d_sae: int
    activation: Activation
    k: int | None
    hook: HookPoint
    layer: int | None
    source: str
    sha256: str
    format: str
    # TopK formats differ after the top-k: SAELens and OpenAI-style TopK apply ReLU to the kept
    # values; Qwen-Scope's official code keeps them as they are (exactly k non-zero, some may be
    # negative).
    topk_relu: bool = True


def encoder_pre(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_pre: torch.Tensor) -> torch.Tensor:
    """``(x - b_pre) @ W_enc + b_enc``: the one encoder (the frozen SAE and its trainable twin)."""
    return (x - b_pre) @ W_enc + b_enc


def activate(pre: torch.Tensor, activation: str, k: int | None, topk_relu: bool = True) -> torch.Tensor:
    """Dense codes from pre-activations: ReLU, or the k largest kept (ReLU'd or as they are,
    ``topk_relu``) and the rest zero. Shared by ``SAE.encode`` and the trainer."""
    if activation == "relu":
        return pre.relu()
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu() if topk_relu else vals)


class SAE(torch.nn.Module):
    """A sparse autoencoder: ``encode_topk`` gives sparse codes, ``decode`` rebuilds x."""

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        info: SAEInfo,
        b_pre: torch.Tensor | None = None,
    ):
        super().__init__()
        d_model, d_sae = W_enc.shape
        expected = {
            "W_enc": (W_enc, (d_model, d_sae)),
            "b_enc": (b_enc, (d_sae,)),
            "W_dec": (W_dec, (d_sae, d_model)),
            "b_dec": (b_dec, (d_model,)),
        }
        if b_pre is not None:
            expected["b_pre"] = (b_pre, (d_model,))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise SAEFormatError(
                    f"{info.source}: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"for d_model={d_model}, d_sae={d_sae}"
                )
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise SAEFormatError(f"{info.source}: {name} has {bad} non-finite (NaN/inf) values")
        if (info.d_model, info.d_sae) != (d_model, d_sae):
            info = replace(info, d_model=d_model, d_sae=d_sae)
        if info.activation == "topk":
            if info.k is None or not 0 < info.k <= d_sae:
                raise SAEFormatError(f"{info.source}: TopK needs 0 < k <= d_sae={d_sae}, got k={info.k}")
        self.info = info
        self.W_enc = torch.nn.Parameter(W_enc.contiguous(), requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc.contiguous(), requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec.contiguous(), requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec.contiguous(), requires_grad=False)
        self.b_pre = torch.nn.Parameter(
            (b_pre if b_pre is not None else torch.zeros_like(b_dec)).contiguous(), requires_grad=False
        )

    # ------------------------------------------------------------------ metadata
    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def d_sae(self) -> int:
        return self.info.d_sae

    @property
    def k(self) -> int | None:
        return self.info.k

    def extra_repr(self) -> str:
        i = self.info
        return f"{i.format} {i.activation} d_model={i.d_model} d_sae={i.d_sae} k={i.k} hook={i.hook} layer={i.layer}"

    # ------------------------------------------------------------------ encoding
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations, computed in the SAE's dtype."""
        return encoder_pre(x.to(self.W_enc.dtype), self.W_enc, self.b_enc, self.b_pre)

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes ``(indices, values)`` of shape ``(..., k)``, sorted by index ascending.

        For a TopK SAE this is exactly its code (k defaults to the SAE's), ReLU'd after the
        top-k or not as its format says (``info.topk_relu``). For a ReLU SAE it is the k largest
        activations (k required), which is lossless when L0 <= k. Entries beyond the active
        features carry value 0.
        """
        k = k or self.info.k
        if k is None:
            raise ValueError("encode_topk on a ReLU SAE needs k")
        pre = self.pre_activations(x)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        if self.info.activation == "relu" or self.info.topk_relu:
            vals = vals.relu()
        order = idx.argsort(dim=-1)
        return idx.gather(-1, order), vals.gather(-1, order)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``(..., d_sae)`` (for small batches, tests and training)."""
        return activate(self.pre_activations(x), self.info.activation, self.info.k, self.info.topk_relu)

    # ------------------------------------------------------------------ decoding
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction from dense codes."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Reconstruction from sparse codes without densifying: sum_j vals_j * W_dec[idx_j]."""
        shape = idx.shape[:-1]
        flat_idx = idx.reshape(-1, idx.shape[-1]).long()
        flat_val = vals.reshape(-1, vals.shape[-1]).to(self.W_dec.dtype)
        out = F.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_val, mode="sum")
        return (out + self.b_dec).reshape(*shape, self.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (the lake records it per layer as ``sae_sha256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sae_matches_model(sae: SAE, hidden_size: int, model_name: str = "the model") -> None:
    """Refuse an SAE whose d_model differs from the model's hidden size, naming both."""
    if sae.d_model != hidden_size:
        raise SAEModelMismatchError(
            f"SAE {sae.info.source} has d_model={sae.d_model} but {model_name} has "
            f"hidden_size={hidden_size}: the SAE was trained on another model"
        )
