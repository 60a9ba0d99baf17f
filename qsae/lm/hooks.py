"""Plain PyTorch hooks on decoder layers: residual after a layer and MLP output, one pass.

TransformerLens does not support Qwen 3.5, so capture hooks the transformers modules
directly. A decoder layer's forward output is the residual stream after that layer (for the
last layer: before the final norm, unlike ``hidden_states[-1]``). In transformers 5 a layer
returns a plain tensor; ``[0]`` is taken only from a tuple (on a tensor it would be batch
row 0). With ``stop_early`` the forward pass stops after the deepest hooked point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qsae.errors import LayerError

RESID, MLP = "resid_post", "mlp_out"


def text_config(model: torch.nn.Module):
    """The text model's config (multimodal wrappers keep it under ``text_config``)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_size(model: torch.nn.Module) -> int:
    return int(text_config(model).hidden_size)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of Llama-family, Qwen3, Qwen3.5 dense and MoE (and wrapped) models."""
    n = int(text_config(model).num_hidden_layers)
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers",
                 "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList) and len(obj) == n:
            return obj
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise LayerError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def check_layers(model: torch.nn.Module, layers: Sequence[int]) -> list[int]:
    """Refuse layers outside 0..n-1 with a message naming the model's range."""
    n = int(text_config(model).num_hidden_layers)
    bad = [layer for layer in layers if not (isinstance(layer, int) and 0 <= layer < n)]
    if bad:
        raise LayerError(f"layers {bad} out of range: {type(model).__name__} has {n} layers (0..{n - 1})")
    return [int(x) for x in layers]


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass early."""


@dataclass
class Captured:
    """Activations captured in one pass: ``resid[layer]``, ``mlp[layer]`` as (B, T|P, d)."""

    resid: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    stopped_early: bool = False


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected module output type {type(output).__name__}")


@contextmanager
def capture(
    model: torch.nn.Module,
    layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
    positions: torch.Tensor | None = None,
    stop_early: bool = False,
) -> Iterator[Captured]:
    """Hook the model for the duration of a ``with`` block; hooks are always removed.

    ``positions`` (B, P) keeps only those token positions per row (saves memory).
    With ``stop_early`` the deepest hook raises an internal exception that
    ``run_with_capture`` catches; use that function rather than catching it yourself.
    """
    layers = check_layers(model, layers)
    mlp_layers = check_layers(model, mlp_layers)
    if not layers and not mlp_layers:
        raise LayerError("nothing to capture: give layers and/or mlp_layers")
    blocks = decoder_layers(model)
    out = Captured()
    events = [(layer, 1, RESID) for layer in layers] + [(layer, 0, MLP) for layer in mlp_layers]
    last = max(events)

    def make_hook(kind: str, layer: int):
        is_last = (layer, 1 if kind == RESID else 0, kind) == last

        def hook(module, inputs, output):
            x = _first_tensor(output)
            if positions is not None:
                rows = torch.arange(x.shape[0], device=x.device)[:, None]
                x = x[rows, positions.to(x.device)]
            (out.resid if kind == RESID else out.mlp)[layer] = x.detach()
            if stop_early and is_last:
                out.stopped_early = True
                raise _StopForward

        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make_hook(RESID, layer)))
        for layer in mlp_layers:
            mlp = getattr(blocks[layer], "mlp", None)
            if mlp is None:
                raise LayerError(f"layer {layer} of {type(model).__name__} has no .mlp module to hook")
            handles.append(mlp.register_forward_hook(make_hook(MLP, layer)))
        yield out
    finally:
        for h in handles:
            h.remove()


def forward_with_capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
    positions: torch.Tensor | None = None,
    stop_early: bool = True,
    **forward_kwargs,
):
    """One hooked forward pass that returns ``(model_output or None, Captured)``.

    ``forward_kwargs`` go to the model (a cache, position ids, ``logits_to_keep``); with
    ``stop_early`` the pass ends after the deepest hooked point and the output is None.
    """
    output = None
    with capture(model, layers, mlp_layers, positions=positions, stop_early=stop_early) as cap:
        try:
            with torch.inference_mode():
                output = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        except _StopForward:
            pass
    return output, cap


def run_with_capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] = (),
    mlp_layers: Sequence[int] = (),
    positions: torch.Tensor | None = None,
    stop_early: bool = True,
    **forward_kwargs,
):
    """One forward pass without a cache that returns ``(model_output or None, Captured)``.

    With ``stop_early`` the pass ends after the deepest hooked point and the output is None
    (no logits): use it when only activations are wanted.
    """
    return forward_with_capture(model, input_ids, attention_mask, layers=layers, mlp_layers=mlp_layers,
                                positions=positions, stop_early=stop_early, use_cache=False, **forward_kwargs)


@contextmanager
def splice(model: torch.nn.Module, layer: int, fn, hook: str = RESID) -> Iterator[None]:
    """Replace the residual stream after ``layer`` (or, with ``hook="mlp_out"``, that layer's MLP
    output) by ``fn(activation)`` for the duration of a ``with`` block (the rest of the model
    then runs on the replacement). Always removed."""
    check_layers(model, [layer])
    block = decoder_layers(model)[layer]
    if hook == MLP:
        block = getattr(block, "mlp", None)
        if block is None:
            raise LayerError(f"layer {layer} of {type(model).__name__} has no .mlp module to splice")
    elif hook != RESID:
        raise ValueError(f"unknown hook {hook!r} (resid_post or mlp_out)")

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        return (fn(output[0]), *output[1:])

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
