"""Sample S completions per prompt and capture two activations per row, in one pass.

``one_pass``: each distinct prompt is prefilled once (the prompt's last-token activations and the
exact first-step distribution come from that prefill); the cache, linear-attention conv and
recurrent states included, is then expanded x S and every row decodes with the seeded sampler
(``qsae.lm.sampling.pick_tokens``: the same hashed uniforms, so the same draws). A row that has
emitted its last token is fed once more, which captures the completion's last-token activation
during decoding, and then leaves the batch (its cache rows are dropped). No second forward pass.

``two_pass``: the reference path the lake was first built with: ``generate`` over every prompt
repeated S times, then one hooked forward over prompt + completion. Kept to check the one-pass
path against and as a fallback for a model family the one-pass loop does not support.

Both return a ``Sampled``; capture turns it into lake variables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from qsae.lm.hooks import MLP, RESID, forward_with_capture
from qsae.lm.sampling import (
    SeededTopPSampler,
    StopOnTokens,
    model_generation_defaults_ignored,
    pick_tokens,
    row_uniforms,
)

DecodePath = Literal["one_pass", "two_pass"]
# Rows of logits turned into float32 and sorted at once by the sampler: bounds its memory to a
# fixed ~12 x SAMPLER_ELEMENTS x 4 bytes instead of growing with the batch.
SAMPLER_ELEMENTS = 1 << 22


@dataclass
class Draw:
    """What to sample: S samples per prompt, seeded per (seed, question id, sample, step)."""

    n_samples: int
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_ids: torch.Tensor  # a row ends at the first of these (EOS and, for PopQA, newline tokens)
    pad_id: int


@dataclass
class Sampled:
    """One batch's draws and activations. Rows are question-major: row r = (r // S, r % S)."""

    tokens: np.ndarray  # (R, T) int32, -1 after the row's end
    lengths: np.ndarray  # (R,) tokens in each completion, its stop token included
    entropy: np.ndarray  # (B,) exact entropy of the first-step distribution (nats)
    nucleus_entropy: np.ndarray  # (B,)
    first_logprob: np.ndarray  # (R,)
    prompt_acts: dict[int, torch.Tensor]  # layer -> (B, d): the prompt's last token
    completion_acts: dict[int, torch.Tensor]  # layer -> (R, d): the completion's last token
    seconds: dict[str, float] = field(default_factory=dict)
    decode_steps: int = 0

    @property
    def first_token(self) -> np.ndarray:
        return self.tokens[:, 0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the prompts left-padded to the longest one."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` makes them for a left-padded batch (pads at 1)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _hook_lists(layers: Sequence[int], hook: str) -> tuple[list[int], list[int]]:
    if hook not in (RESID, MLP):
        raise ValueError(f"unknown hook {hook!r} (resid_post or mlp_out)")
    return (list(layers), []) if hook == RESID else ([], list(layers))


def _pick_chunked(logits: torch.Tensor, rows: Sequence[tuple[int, int]], step: int, draw: Draw,
                  source: torch.Tensor | None = None, first: bool = False):
    """Draw a token for each of ``rows`` from ``logits[source[i]]`` (default: row i), a chunk at a time."""
    n = len(rows)
    vocab = logits.shape[-1]
    per = max(1, SAMPLER_ELEMENTS // vocab)
    us = row_uniforms(draw.seed, rows, step)
    parts = []
    for a in range(0, n, per):
        idx = torch.arange(a, min(n, a + per), device=logits.device)
        src = idx if source is None else source[a:a + per]
        parts.append(pick_tokens(logits[src].float(), us[a:a + per], draw.temperature, draw.top_p, first=first))
    token = torch.cat([p.token for p in parts])
    logprob = torch.cat([p.logprob for p in parts])
    return token, logprob, parts


def one_pass(model: torch.nn.Module, prompts: Sequence[Sequence[int]], question_ids: Sequence[int], draw: Draw,
             layers: Sequence[int], hook: str = RESID) -> Sampled:
    """Sample and capture with one prefill per prompt and one decode step per new token."""
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    B, S, T = len(prompts), draw.n_samples, draw.max_new_tokens
    R = B * S
    resid_layers, mlp_layers = _hook_lists(layers, hook)
    ids, mask = left_pad(prompts, draw.pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    P = ids.shape[1]
    stop_ids = draw.stop_ids.to(dev)
    cache = DynamicCache(config=model.config)
    last_pos = torch.full((B, 1), P - 1, dtype=torch.long, device=dev)
    with torch.inference_mode():
        out, cap = forward_with_capture(model, ids, mask, layers=resid_layers, mlp_layers=mlp_layers,
                                        positions=last_pos, stop_early=False, position_ids=_positions(mask),
                                        cache=cache, use_cache=True, logits_to_keep=1)
        acts = cap.resid if hook == RESID else cap.mlp
        prompt_acts = {layer: acts[layer][:, 0] for layer in layers}
        logits0 = out.logits[:, -1]
        del out
        rows = [(int(q), s) for q in question_ids for s in range(S)]
        q_of_row = torch.arange(B, device=dev).repeat_interleave(S)
        token, logprob, parts = _pick_chunked(logits0, rows, 0, draw, source=q_of_row, first=True)
        first_entropy = torch.cat([p.entropy for p in parts]).view(B, S)[:, 0]
        first_nucleus = torch.cat([p.nucleus_entropy for p in parts]).view(B, S)[:, 0]
        del logits0, parts
        t_prefill = time.perf_counter()

        tokens = torch.full((R, T), -1, dtype=torch.long, device=dev)
        tokens[:, 0] = token
        lengths = torch.ones(R, dtype=torch.long, device=dev)
        completion_acts = {layer: torch.empty((R, acts[layer].shape[-1]), dtype=acts[layer].dtype, device=dev)
                           for layer in layers}
        cache.reorder_cache(q_of_row)  # every state x S, linear-attention conv/recurrent ones included
        mask = mask.repeat_interleave(S, 0)
        live = torch.arange(R, device=dev)  # global row of each batch row
        last = token
        final = torch.isin(last, stop_ids) | (T == 1)
        steps = 0
        while True:
            steps += 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = mask.sum(-1, keepdim=True) - 1
            everyone_done = bool(final.all())
            out, cap = forward_with_capture(model, last[:, None], mask, layers=resid_layers, mlp_layers=mlp_layers,
                                            stop_early=everyone_done, position_ids=position, cache=cache,
                                            use_cache=True, logits_to_keep=1)
            acts = cap.resid if hook == RESID else cap.mlp
            if bool(final.any()):
                for layer in layers:
                    completion_acts[layer][live[final]] = acts[layer][final, -1]
            if everyone_done:
                break
            keep = ~final
            logits = out.logits[:, -1]
            del out
            kept_rows = [rows[i] for i in live[keep].tolist()]
            token, _, _ = _pick_chunked(logits, kept_rows, steps, draw,
                                        source=keep.nonzero().squeeze(-1))
            del logits
            if not bool(keep.all()):
                keep_idx = keep.nonzero().squeeze(-1)
                cache.reorder_cache(keep_idx)
                mask, live = mask[keep_idx], live[keep_idx]
            tokens[live, steps] = token
            lengths[live] += 1
            last = token
            final = torch.isin(last, stop_ids) | (steps + 1 >= T)
    del cache
    t_end = time.perf_counter()
    return Sampled(
        tokens=tokens.cpu().numpy().astype(np.int32), lengths=lengths.cpu().numpy().astype(np.int32),
        entropy=first_entropy.cpu().numpy().astype(np.float64),
        nucleus_entropy=first_nucleus.cpu().numpy().astype(np.float64),
        first_logprob=logprob.cpu().numpy().astype(np.float32),
        prompt_acts=prompt_acts, completion_acts=completion_acts,
        seconds={"prefill": t_prefill - t0, "decode": t_end - t_prefill}, decode_steps=steps,
    )


def two_pass(model: torch.nn.Module, prompts: Sequence[Sequence[int]], question_ids: Sequence[int], draw: Draw,
             layers: Sequence[int], hook: str = RESID, eos_token_id=None, bos_token_id=None) -> Sampled:
    """The reference path: ``generate`` on each prompt repeated S times, then one hooked forward
    over prompt + completion (right-padded) reading the two positions."""
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    B, S, T = len(prompts), draw.n_samples, draw.max_new_tokens
    R = B * S
    resid_layers, mlp_layers = _hook_lists(layers, hook)
    ids, mask = left_pad(prompts, draw.pad_id)
    P = ids.shape[1]
    gen_ids = ids.repeat_interleave(S, 0).to(dev)
    gen_mask = mask.repeat_interleave(S, 0).to(dev)
    rows = [(int(q), s) for q in question_ids for s in range(S)]
    sampler = SeededTopPSampler(rows, P, draw.seed, draw.temperature, draw.top_p)
    stops = [StopOnTokens(draw.stop_ids, P)]
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=T, pad_token_id=draw.pad_id,
                               eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    with torch.inference_mode(), model_generation_defaults_ignored(model):
        out = model.generate(input_ids=gen_ids, attention_mask=gen_mask, generation_config=gen_cfg,
                             logits_processor=LogitsProcessorList([sampler]),
                             stopping_criteria=StoppingCriteriaList(stops))
    new_np = out[:, P:].cpu().numpy()
    t_gen = time.perf_counter()
    stop_set = set(draw.stop_ids.tolist())
    lengths = np.empty(R, np.int32)
    tokens = np.full((R, T), -1, np.int32)
    for r in range(R):
        seq = new_np[r]
        end = next((j + 1 for j, t in enumerate(seq) if t in stop_set), len(seq))
        lengths[r] = end
        tokens[r, :end] = seq[:end]
    L = int((np.array([len(p) for p in prompts]).repeat(S) + lengths).max())
    fwd_ids = torch.full((R, L), draw.pad_id, dtype=torch.long)
    fwd_mask = torch.zeros((R, L), dtype=torch.long)
    positions = torch.empty((R, 2), dtype=torch.long)
    for r in range(R):
        p = list(prompts[r // S])
        seq = p + tokens[r, : lengths[r]].tolist()
        fwd_ids[r, : len(seq)] = torch.tensor(seq)
        fwd_mask[r, : len(seq)] = 1
        positions[r] = torch.tensor([len(p) - 1, len(seq) - 1])
    with torch.inference_mode():
        _, cap = forward_with_capture(model, fwd_ids.to(dev), fwd_mask.to(dev), layers=resid_layers,
                                      mlp_layers=mlp_layers, positions=positions.to(dev), stop_early=True,
                                      use_cache=False)
    acts = cap.resid if hook == RESID else cap.mlp
    t_fwd = time.perf_counter()
    return Sampled(
        tokens=tokens, lengths=lengths,
        entropy=sampler.first_entropy.numpy().reshape(B, S)[:, 0].astype(np.float64),
        nucleus_entropy=sampler.first_nucleus_entropy.numpy().reshape(B, S)[:, 0].astype(np.float64),
        first_logprob=sampler.first_logprob.numpy().astype(np.float32),
        prompt_acts={layer: acts[layer][::S, 0] for layer in layers},
        completion_acts={layer: acts[layer][:, 1] for layer in layers},
        seconds={"generate": t_gen - t0, "forward": t_fwd - t_gen}, decode_steps=int(new_np.shape[1]),
    )


def sample_and_capture(path: DecodePath, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                       question_ids: Sequence[int], draw: Draw, layers: Sequence[int], hook: str = RESID,
                       **kwargs) -> Sampled:
    """Run the named decode path (``one_pass`` or the reference ``two_pass``)."""
    if path == "one_pass":
        return one_pass(model, prompts, question_ids, draw, layers, hook)
    if path == "two_pass":
        return two_pass(model, prompts, question_ids, draw, layers, hook, **kwargs)
    raise ValueError(f"unknown decode path {path!r} (one_pass or two_pass)")


__all__ = ["DecodePath", "Draw", "Sampled", "left_pad", "one_pass", "sample_and_capture", "two_pass"]
