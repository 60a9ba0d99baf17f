"""Loaders from published SAE formats into ``qsae.sae.model.SAE``.

Formats:
- Qwen-Scope ``layer{n}.sae.pt``: dict of ``W_enc (d_sae, d_model)``, ``W_dec (d_model, d_sae)``,
  ``b_enc (d_sae,)``, ``b_dec (d_model,)``; TopK with k from the caller or the repo name
  (``...-L0_50``); residual stream after layer n.
- The 9B release's ReLU checkpoint: ``{"model_state_dict": {bias, encoder.weight (d_sae, d_in),
  encoder.bias, decoder.weight (d_in, d_sae)}}``; ``bias`` subtracted before encoding and added
  after decoding; reads the MLP output.
- SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (``standard`` and ``topk``).
- A Hugging Face repo id, resolved only through the local cache (never downloaded here).

``.pt`` files are pickles: they are read with ``torch.load(weights_only=True)`` and anything
that needs more than tensors and plain containers is refused before any of it runs.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from qsae.errors import SAEFormatError, UntrustedPickleError
from qsae.sae.locate import LAYER_FILE as _LAYER_FILE
from qsae.sae.locate import SAELENS_CFG, SAELENS_WEIGHTS, looks_like_repo_id, resolve_hf_repo, sae_layers, sae_path  # noqa: F401 (re-exported)
from qsae.sae.locate import hook_of as _hook_of
from qsae.sae.model import SAE, SAEInfo, file_sha256

QWEN_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
RELU_KEYS = ("bias", "encoder.weight", "encoder.bias", "decoder.weight")


def k_from_name(name: str) -> int | None:
    """The k that a Qwen-Scope repo name encodes (``...-L0_50`` -> 50), if any."""
    m = re.search(r"L0[_-](\d+)", name)
    return int(m.group(1)) if m else None


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that refuses pickles needing arbitrary globals (nothing runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UntrustedPickleError(
            f"refusing to load {path}: it is a pickle that needs more than tensors to load "
            f"({detail.strip()}). qsae loads .pt files with weights_only=True only; convert "
            "the file to safetensors or a plain dict of tensors from a source you trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise SAEFormatError(f"{path}: no such SAE file") from None
        raise SAEFormatError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                             "(a truncated or damaged file? copy it again)") from None


def _as_float(t: Any, name: str, source: str, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise SAEFormatError(f"{source}: {name} is a {type(t).__name__}, expected a tensor")
    return t.detach().to(dtype)


def _require(d: Mapping[str, Any], keys: Sequence[str], source: str, fmt: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise SAEFormatError(
            f"{source}: not a valid {fmt} SAE, missing keys {missing}; found {sorted(map(str, d))[:12]}"
        )


def _shape_check(name: str, t: torch.Tensor, shape: tuple[int, ...], source: str, hint: str = "") -> None:
    if tuple(t.shape) != shape:
        raise SAEFormatError(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape}{hint}")


def from_qwen_scope_dict(
    d: Mapping[str, Any], *, source: str, sha256: str, k: int | None, layer: int | None,
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """Build an SAE from a Qwen-Scope state dict (W_enc (d_sae, d_model), W_dec (d_model, d_sae))."""
    _require(d, QWEN_SCOPE_KEYS, source, "Qwen-Scope")
    W_enc, W_dec, b_enc, b_dec = (_as_float(d[n], n, source, dtype) for n in QWEN_SCOPE_KEYS)
    if W_enc.ndim != 2:
        raise SAEFormatError(f"{source}: W_enc must be 2-D (d_sae, d_model), got shape {tuple(W_enc.shape)}")
    d_sae, d_model = W_enc.shape
    _shape_check("W_dec", W_dec, (d_model, d_sae), source,
                 " (looks transposed)" if tuple(W_dec.shape) == (d_sae, d_model) and d_sae != d_model else "")
    _shape_check("b_enc", b_enc, (d_sae,), source)
    _shape_check("b_dec", b_dec, (d_model,), source)
    k = k if k is not None else k_from_name(source)
    if k is None:
        raise SAEFormatError(f"{source}: a Qwen-Scope TopK SAE needs k (pass k=, or a repo name with L0_<k>)")
    info = SAEInfo(d_model, d_sae, "topk", k, "resid_post", layer, source, sha256, "qwen-scope", topk_relu=False)
    return SAE(W_enc.T, b_enc, W_dec.T, b_dec, info)


def from_relu_checkpoint(
    ckpt: Mapping[str, Any], *, source: str, sha256: str, layer: int | None,
    hook: str = "mlp_out", dtype: torch.dtype = torch.float32,
) -> SAE:
    """Build an SAE from the 9B release's checkpoint (ReLU, pre-encoder bias, MLP output)."""
    _require(ckpt, ("model_state_dict",), source, "ReLU checkpoint")
    sd = ckpt["model_state_dict"]
    if not isinstance(sd, Mapping):
        raise SAEFormatError(f"{source}: model_state_dict is a {type(sd).__name__}, expected a dict")
    _require(sd, RELU_KEYS, source, "ReLU checkpoint")
    bias, W_e, b_e, W_d = (_as_float(sd[n], n, source, dtype) for n in RELU_KEYS)
    if W_e.ndim != 2:
        raise SAEFormatError(f"{source}: encoder.weight must be 2-D (d_sae, d_in), got {tuple(W_e.shape)}")
    d_sae, d_in = W_e.shape
    _shape_check("bias", bias, (d_in,), source)
    _shape_check("encoder.bias", b_e, (d_sae,), source)
    _shape_check("decoder.weight", W_d, (d_in, d_sae), source)
    info = SAEInfo(d_in, d_sae, "relu", None, hook, layer, source, sha256, "relu-checkpoint")  # type: ignore[arg-type]
    return SAE(W_e.T, b_e, W_d.T, bias, info, b_pre=bias)


def from_saelens_folder(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> SAE:
    """Build an SAE from a SAELens folder (architectures ``standard`` and ``topk``)."""
    folder = Path(folder)
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise SAEFormatError(f"{folder}: not a SAELens folder, missing {p.name}")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk"):
        raise SAEFormatError(f"{folder}: SAELens architecture {arch!r} is not supported (standard, topk)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise SAEFormatError(f"{folder}: normalize_activations={norm!r} is not supported (only 'none')")
    try:
        sd = load_file(str(w_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise SAEFormatError(f"cannot read {w_path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                             "(a truncated or damaged file? copy it again)") from None
    _require(sd, ("W_enc", "W_dec", "b_enc", "b_dec"), str(folder), "SAELens")
    W_enc, W_dec, b_enc, b_dec = (_as_float(sd[n], n, str(folder), dtype) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    d_in, d_sae = int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[-1]))
    _shape_check("W_enc", W_enc, (d_in, d_sae), str(folder))
    hook, layer, _ = _hook_of(cfg)
    k = int(cfg["k"]) if arch == "topk" else None
    b_pre = b_dec if cfg.get("apply_b_dec_to_input", True) else None  # SAELens' default, every architecture
    activation = "topk" if arch == "topk" else "relu"
    info = SAEInfo(d_in, d_sae, activation, k, hook, layer, str(folder), file_sha256(w_path), f"saelens-{arch}")  # type: ignore[arg-type]
    return SAE(W_enc, b_enc, W_dec, b_dec, info, b_pre=b_pre)


def load_sae_file(
    path: str | Path, *, k: int | None = None, layer: int | None = None, hook: str | None = None,
    dtype: torch.dtype = torch.float32, source: str | None = None,
) -> SAE:
    """Load a single ``.pt`` SAE file, telling Qwen-Scope and ReLU-checkpoint formats by keys."""
    path = Path(path)
    source = source or str(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise SAEFormatError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if layer is None:
        m = _LAYER_FILE.search(path.name)
        layer = int(m.group(1)) if m else None
    sha = file_sha256(path)
    if "model_state_dict" in obj:
        return from_relu_checkpoint(obj, source=source, sha256=sha, layer=layer, hook=hook or "mlp_out", dtype=dtype)
    return from_qwen_scope_dict(obj, source=source, sha256=sha, k=k, layer=layer, dtype=dtype)


def load_sae(
    source: str | Path, *, layer: int | None = None, k: int | None = None, hook: str | None = None,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> SAE:
    """Load one SAE from a file, a folder or a cached Hugging Face repo id.

    A folder of Qwen-Scope files (or such a repo) needs ``layer`` to pick ``layer{n}.sae.pt``;
    a folder of SAELens sub-folders is searched for the one hooked at ``layer``.
    """
    source = str(source)
    name_k = k if k is not None else k_from_name(source)
    path = sae_path(source)
    if path.is_file():
        sae = load_sae_file(path, k=name_k, layer=layer, hook=hook, dtype=dtype, source=str(path))
    elif (path / SAELENS_CFG).exists():
        sae = from_saelens_folder(path, dtype=dtype)
    else:
        sae = _load_from_folder(path, source, layer, name_k, hook, dtype)
    if layer is not None and sae.info.layer is not None and sae.info.layer != layer:
        raise SAEFormatError(f"{source}: this SAE reads layer {sae.info.layer}, not layer {layer}")
    if layer is not None and sae.info.layer is None:
        sae.info = replace(sae.info, layer=layer)
    return sae.to(device)


def _load_from_folder(path: Path, source: str, layer: int | None, k: int | None, hook: str | None,
                      dtype: torch.dtype) -> SAE:
    have = sae_layers(path)  # which layers the folder serves, read as the checks before loading read it
    first = next(iter(have.values()))[0]
    if list(have) == [None] and first.is_file():  # one .pt file: its layer is known once loaded
        return load_sae_file(first, k=k, layer=layer, hook=hook, dtype=dtype)
    known = sorted(x for x in have if x is not None)
    picked = have.get(layer, []) if layer is not None else []
    if first.is_file():  # Qwen-Scope: layer<n>.sae.pt
        if layer is None:
            raise SAEFormatError(f"{source} holds one SAE per layer ({known}); pass layer=")
        if not picked:
            raise SAEFormatError(f"{source} has no SAE for layer {layer}; it has layers {known}")
        return load_sae_file(picked[0], k=k, layer=layer, hook=hook, dtype=dtype, source=f"{source}/{picked[0].name}")
    if len(picked) != 1:
        raise SAEFormatError(f"{source} holds SAELens SAEs for layers {known}; pass a layer that has exactly one "
                             f"(got {layer})")
    return from_saelens_folder(picked[0], dtype=dtype)


def load_saes(
    source: str | Mapping[int, str], layers: Sequence[int], *, k: int | None = None,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> dict[int, SAE]:
    """One SAE per requested layer, from a per-layer source or a {layer: source} mapping."""
    if isinstance(source, Mapping):
        missing = [layer for layer in layers if layer not in source]
        if missing:
            raise SAEFormatError(f"no SAE given for layers {missing}")
        return {layer: load_sae(source[layer], layer=layer, k=k, device=device, dtype=dtype) for layer in layers}
    return {layer: load_sae(source, layer=layer, k=k, device=device, dtype=dtype) for layer in layers}
