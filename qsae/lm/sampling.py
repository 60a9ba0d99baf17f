"""Reproducible temperature + top-p sampling, seeded per (run seed, question id, sample, step).

``transformers.generate`` samples from one global RNG, so a question's samples would depend
on which other questions share its batch, and a retried or resumed question would come out
differently. Here every draw is one uniform number derived by hashing (seed, question id,
sample, step); the token is picked by inverse-CDF within the top-p nucleus of
softmax(logits / temperature). ``generate`` runs greedily over scores that this processor
sets to 0 for the chosen token and -inf elsewhere, so caching, padding and the model's own
cache types (hybrid linear attention included) stay transformers' business.

At the first step it also keeps what the lake stores per question: the exact entropy of
softmax(logits / temperature) over the whole vocabulary, and each sample's first-token
log-probability under that distribution.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria

# Part of every question lake's identity (its lineage): a lake's samples are reproducible by
# this sampler only. Never derive it from the class's module path; bump /v2 if draws change.
SAMPLER_ID = "qsae.sampling.SeededTopPSampler/v1"


def uniform(seed: int, question_id: int, sample: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on its four arguments (53-bit)."""
    digest = hashlib.blake2b(struct.pack("<qqqq", seed, question_id, sample, step), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature), in float64."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def nucleus_entropy(kept: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of kept probabilities (zeros outside the nucleus), renormalised."""
    p = kept.double() / kept.double().sum(-1, keepdim=True)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def empirical_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the empirical distribution of a 1-D array of token ids."""
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


class SeededTopPSampler(LogitsProcessor):
    """Picks each row's next token from its own hashed uniform; see the module docstring."""

    def __init__(self, rows: Sequence[tuple[int, int]], prompt_len: int, seed: int, temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError("temperature must be > 0 for sampling")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.rows = list(rows)  # (question_id, sample) per batch row
        self.prompt_len = prompt_len
        self.seed = seed
        self.temperature = temperature
        self.top_p = top_p
        self.first_entropy: torch.Tensor | None = None
        self.first_nucleus_entropy: torch.Tensor | None = None
        self.first_logprob: torch.Tensor | None = None
        self.first_token: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        us = row_uniforms(self.seed, self.rows, step)
        picked = pick_tokens(scores, us, self.temperature, self.top_p, first=step == 0)
        token = picked.token[:, None]
        if step == 0:
            self.first_entropy = picked.entropy.cpu()
            self.first_nucleus_entropy = picked.nucleus_entropy.cpu()
            self.first_logprob = picked.logprob.cpu()
            self.first_token = picked.token.cpu()
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, token, 0.0)
        return out


def row_uniforms(seed: int, rows: Sequence[tuple[int, int]], step: int) -> torch.Tensor:
    """The hashed uniform of each (question id, sample) row at ``step``, as float64."""
    return torch.tensor([uniform(seed, q, s, step) for q, s in rows], dtype=torch.float64)


@dataclass
class Picked:
    """One step's draws: token per row, its log-probability, and at the first step the entropies."""

    token: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor | None = None
    nucleus_entropy: torch.Tensor | None = None


# Candidates sorted first; a row whose nucleus is wider than this is sorted over the whole vocabulary.
NUCLEUS_CANDIDATES = 1024


def _nucleus(logp: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept probabilities in descending order, zeros past the nucleus; their token ids).

    Only the nucleus matters, so the ``NUCLEUS_CANDIDATES`` most likely tokens are sorted
    (``topk``); rows whose nucleus does not fit in them are sorted whole. Both give the same
    kept prefix as a full sort (the test checks it against the full-sort reference).
    """
    n, vocab = logp.shape
    k = min(vocab, NUCLEUS_CANDIDATES)
    top_logp, order = logp.topk(k, dim=-1, sorted=True)
    top_p_ = top_logp.exp()
    before = top_p_.cumsum(-1) - top_p_  # mass of strictly more likely tokens
    kept = torch.where(before < top_p, top_p_, torch.zeros_like(top_p_))
    wide = (before[:, -1] < top_p).nonzero().squeeze(-1) if k < vocab else before.new_zeros(0, dtype=torch.long)
    if wide.numel():  # the nucleus may reach past the candidates: sort these rows whole
        full_logp, full_order = logp[wide].sort(dim=-1, descending=True)
        full_p = full_logp.exp()
        full_before = full_p.cumsum(-1) - full_p
        full_kept = torch.where(full_before < top_p, full_p, torch.zeros_like(full_p))
        width = int((full_kept > 0).sum(-1).max())
        if width > k:
            pad = torch.zeros((n, width - k), dtype=kept.dtype, device=kept.device)
            kept = torch.cat([kept, pad], dim=1)
            order = torch.cat([order, torch.zeros((n, width - k), dtype=order.dtype, device=order.device)], dim=1)
        kept[wide] = 0
        kept[wide, :width] = full_kept[:, :width]
        order[wide, :width] = full_order[:, :width]
    return kept, order


def pick_tokens(scores: torch.Tensor, us: torch.Tensor, temperature: float, top_p: float, first: bool = False) -> Picked:
    """Inverse-CDF draw of each row's token within the top-p nucleus of softmax(scores / T).

    The one definition of a draw: ``generate``'s processor and qsae's own decode loop both
    call it, so the same uniforms give the same tokens whichever path runs.
    """
    logp = torch.log_softmax(scores.float() / temperature, dim=-1)
    kept, order = _nucleus(logp, top_p)
    cdf = kept.cumsum(-1)
    target = us.to(device=cdf.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    pos = (cdf <= target).sum(-1, keepdim=True).clamp_(max=cdf.shape[1] - 1)
    # Never step past the nucleus (float rounding at the end of the cdf).
    n_kept = (kept > 0).sum(-1, keepdim=True)
    pos = torch.minimum(pos, n_kept - 1)
    token = order.gather(-1, pos)
    out = Picked(token.squeeze(-1), logp.gather(-1, token).squeeze(-1))
    if first:
        out.entropy = entropy_from_logits(scores, temperature)
        out.nucleus_entropy = nucleus_entropy(kept)
    return out


class StopOnTokens(StoppingCriteria):
    """Per-row stop once a row emits one of ``stop_ids`` (e.g. any token containing a newline)."""

    def __init__(self, stop_ids: torch.Tensor, prompt_len: int):
        self.stop_ids = stop_ids
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[1] <= self.prompt_len:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))


_NEWLINE_CACHE: dict[int, torch.Tensor] = {}


def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every vocabulary token whose text contains a newline (computed once per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_CACHE:
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        _NEWLINE_CACHE[key] = torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)
    return _NEWLINE_CACHE[key]


@contextmanager
def model_generation_defaults_ignored(model: Any) -> Iterator[None]:
    """Run ``generate`` as if the model shipped no ``generation_config.json``.

    transformers 5 fills every generation field a caller leaves unset from the model's own
    generation config, and the processors those fields make (repetition_penalty,
    no_repeat_ngram_size, suppress_tokens, min_new_tokens, bad_words_ids, num_beams, ...) run
    before qsae's sampler: they would change both the samples and the "exact" entropy. With
    the model's config swapped for transformers' plain defaults, qsae's sampler sees
    logits / T and nothing else.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved

