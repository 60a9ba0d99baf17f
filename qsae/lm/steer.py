"""Interventions on the residual stream: add a per-row vector to a layer's output at chosen
positions, and greedy decoding of one prompt under many conditions in one batch.

``greedy_conditions`` decodes one prompt under C conditions (each a vector added to the layer's
output at the last position of every forward pass: the prompt's last token, then each generated
token, as the rivalry paper's steering hook does) in one batch: the prompt's tokens but the last
are prefilled once with no intervention (shared by every condition, since only the last position
is ever steered), the cache (Qwen3.5's linear-attention states included) is expanded to the C
rows, and each row is fed its own vector from then on. Greedy is argmax of the logits, the
model's own generation_config (repetition penalty ...) not applied, as in capture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from qsae.lm.hooks import RESID, splice


def add_at(x: torch.Tensor, vectors: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (B, T, d) with ``vectors[b]`` added at position ``positions[b]`` of row b (default:
    the last position); every other entry unchanged. A new tensor: the input is not modified."""
    out = x.clone()
    rows = torch.arange(x.shape[0], device=x.device)
    pos = torch.full_like(rows, x.shape[1] - 1) if positions is None else positions.to(x.device)
    out[rows, pos] = out[rows, pos] + vectors.to(device=x.device, dtype=x.dtype)
    return out


class Steering:
    """The vectors added at a layer's output while a ``steer`` block is open: ``rows`` picks, for
    each batch row of the next forward pass, its row of the full table (rows leave as they finish)."""

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors
        self.rows: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        return self.vectors if self.rows is None else self.vectors[self.rows]


@contextmanager
def steer(model: torch.nn.Module, layer: int, steering: Steering, hook: str = RESID,
          positions: torch.Tensor | None = None) -> Iterator[Steering]:
    """Add ``steering.current()`` to ``layer``'s output (the residual after it, or its MLP output)
    at ``positions`` (default: each forward's last position) for the duration of the block."""
    with splice(model, layer, lambda x: add_at(x, steering.current(), positions), hook=hook):
        yield steering


@dataclass
class Greedy:
    """Greedy completions of one prompt under C conditions, and the first step's distribution."""

    tokens: np.ndarray  # (C, T) int64, -1 after the row's end
    lengths: np.ndarray  # (C,) tokens generated (a stop token included)
    first_entropy: np.ndarray  # (C,) exact entropy (nats) of the first generated token's distribution
    first_kl: np.ndarray | None = None  # (C,) KL(reference || condition) at the first step, with a reference
    first_logprobs: np.ndarray | None = field(default=None, repr=False)  # (C, V), when asked
    left_early: int = 0  # rows that left before a stop token or the token limit (``settled``)
    steps: int = 0


def greedy_conditions(model: torch.nn.Module, prompt: Sequence[int], vectors: torch.Tensor, layer: int,
                      max_new_tokens: int, stop_ids: Sequence[int], hook: str = RESID,
                      settled: Callable[[int, list[int]], bool] | None = None,
                      reference_logprobs: torch.Tensor | None = None, keep_logprobs: bool = False) -> Greedy:
    """Greedy decoding of ``prompt`` under each row of ``vectors`` (C, d) added at ``layer`` (see
    the module docstring). A row ends at a stop token or after ``max_new_tokens``; it may leave
    earlier when ``settled(row, tokens so far)`` says nothing it could still generate changes
    what the caller wants of it."""
    dev = next(model.parameters()).device
    C = vectors.shape[0]
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    P = ids.shape[1]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    table = Steering(vectors.to(dev))
    with torch.inference_mode():
        if P > 1:  # every position but the last: never steered, shared by all conditions
            model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]),
                  position_ids=torch.arange(P - 1, device=dev)[None], cache=cache, use_cache=True, logits_to_keep=1)
        cache.reorder_cache(torch.zeros(C, dtype=torch.long, device=dev))  # x C, linear-attention states too
        tokens = torch.full((C, max_new_tokens), -1, dtype=torch.long, device=dev)
        lengths = torch.zeros(C, dtype=torch.long, device=dev)
        live = torch.arange(C, device=dev)
        last = ids[:, -1].expand(C)
        out = Greedy(np.empty((C, 0)), np.empty(0), np.empty(C))
        with steer(model, layer, table, hook=hook):
            for step in range(max_new_tokens):
                table.rows = live
                n = P + step
                logits = model(input_ids=last[:, None], attention_mask=torch.ones((live.numel(), n), dtype=torch.long,
                                                                                 device=dev),
                               position_ids=torch.full((live.numel(), 1), n - 1, device=dev), cache=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1].float()
                if step == 0:
                    lp = torch.log_softmax(logits, -1)
                    out.first_entropy = (-(lp.exp() * lp).sum(-1)).cpu().numpy()
                    if reference_logprobs is not None:
                        ref = reference_logprobs.to(dev).float()
                        out.first_kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0).cpu().numpy()
                    if keep_logprobs:
                        out.first_logprobs = lp.cpu().numpy()
                token = logits.argmax(-1)
                tokens[live, step] = token
                lengths[live] += 1
                done = torch.isin(token, stops) | (step + 1 >= max_new_tokens)
                if settled is not None:
                    for i in torch.nonzero(~done).flatten().tolist():
                        row = int(live[i])
                        if settled(row, tokens[row, : int(lengths[row])].tolist()):
                            done[i] = True
                            out.left_early += 1
                out.steps = step + 1
                if bool(done.all()):
                    break
                keep = torch.nonzero(~done).flatten()
                if keep.numel() < live.numel():
                    cache.reorder_cache(keep)
                    live = live[keep]
                last = token[keep]
    out.tokens, out.lengths = tokens.cpu().numpy(), lengths.cpu().numpy()
    return out
