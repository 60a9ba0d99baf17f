"""The seeded top-p sampler: right distribution, same nucleus as transformers, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import TopPLogitsWarper

from qsae.lm.sampling import (
    SeededTopPSampler,
    empirical_entropy,
    entropy_from_logits,
    nucleus_entropy,
    pick_tokens,
    uniform,
)


def _pick(sampler, logits, prompt_len=3, step=0):
    ids = torch.zeros((logits.shape[0], prompt_len + step), dtype=torch.long)
    out = sampler(ids, logits)
    assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one token allowed per row
    return out.argmax(-1)


def test_nucleus_matches_transformers_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    for top_p in (0.5, 0.9, 1.0):
        hf = TopPLogitsWarper(top_p)(None, logits / 0.8)
        allowed = torch.isfinite(hf)
        rows = [(r, s) for r in range(64) for s in range(1)]
        # Every token our sampler ever picks over many draws lies in transformers' nucleus.
        for s in range(40):
            sampler = SeededTopPSampler([(q, s) for q, _ in rows], 3, seed=1, temperature=0.8, top_p=top_p)
            tok = _pick(sampler, logits)
            assert allowed[torch.arange(64), tok].all()


def test_draws_follow_the_renormalised_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0, -5.0]])
    temperature, top_p = 1.3, 0.9
    p = torch.softmax(logits / temperature, -1)[0].numpy()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    nucleus = order[before < top_p]
    expected = np.zeros_like(p)
    expected[nucleus] = p[nucleus] / p[nucleus].sum()
    n = 4000
    counts = np.zeros(len(p))
    for s in range(n):
        sampler = SeededTopPSampler([(123, s)], 3, seed=5, temperature=temperature, top_p=top_p)
        counts[int(_pick(sampler, logits))] += 1
    assert counts[expected == 0].sum() == 0
    stat = scipy.stats.chisquare(counts[nucleus], expected[nucleus] * n)
    assert stat.pvalue > 1e-3, stat


def test_draws_depend_only_on_seed_question_sample_step():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 30, generator=g)
    a = SeededTopPSampler([(10, 0), (10, 1), (11, 0), (11, 1), (12, 0), (12, 1)], 4, 3, 1.0, 0.95)
    b = SeededTopPSampler([(11, 1), (11, 0)], 4, 3, 1.0, 0.95)  # other batch, other order
    ta = _pick(a, logits, prompt_len=4)
    tb = _pick(b, logits[[3, 2]], prompt_len=4)
    assert ta[3] == tb[0] and ta[2] == tb[1]
    assert uniform(3, 11, 1, 0) == uniform(3, 11, 1, 0) != uniform(3, 11, 1, 1)
    us = np.array([uniform(0, q, 0, 0) for q in range(5000)])
    assert scipy.stats.kstest(us, "uniform").pvalue > 1e-3


def test_entropies_against_scipy():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    ref = scipy.stats.entropy(scipy.special.softmax(logits.double().numpy() / 0.7, axis=-1), axis=-1)
    np.testing.assert_allclose(entropy_from_logits(logits, 0.7).numpy(), ref, rtol=1e-10)
    toks = np.array([5, 5, 7, 9, 9, 9])
    assert np.isclose(empirical_entropy(toks), scipy.stats.entropy([2, 1, 3]))
    sampler = SeededTopPSampler([(1, 0), (2, 0), (3, 0)], 2, 0, 0.7, 0.9)
    _pick(sampler, logits, prompt_len=2)
    np.testing.assert_allclose(sampler.first_entropy.numpy(), ref, rtol=1e-10)


def _full_sort_draw(scores, us, temperature, top_p):
    """The sampler as first written (the whole vocabulary sorted): the reference for pick_tokens."""
    logp = torch.log_softmax(scores.float() / temperature, dim=-1)
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    sorted_p = sorted_logp.exp()
    before = sorted_p.cumsum(-1) - sorted_p
    kept = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    cdf = kept.cumsum(-1)
    target = us.to(cdf.dtype)[:, None] * cdf[:, -1:]
    pos = (cdf <= target).sum(-1, keepdim=True).clamp_(max=cdf.shape[1] - 1)
    pos = torch.minimum(pos, (kept > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, pos).squeeze(-1), nucleus_entropy(kept)


@pytest.mark.parametrize("vocab", [50, 3000])
def test_candidate_nucleus_draws_what_a_full_sort_draws(vocab, monkeypatch):
    """pick_tokens sorts only the top candidates (full sort for rows whose nucleus is wider):
    the same tokens and nucleus entropies as sorting the whole vocabulary, narrow and wide rows."""
    import qsae.lm.sampling as sampling

    candidates = 16 if vocab < 64 else 64
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)  # so that many rows need the fallback
    g = torch.Generator().manual_seed(5)
    wide = 0
    for scale in (0.3, 1.0, 3.0, 10.0):
        scores = torch.randn(300, vocab, generator=g) * scale
        us = torch.rand(300, generator=g, dtype=torch.float64)
        for temperature, top_p in ((1.0, 0.9), (0.7, 0.95), (1.0, 1.0), (2.0, 0.5)):
            got = pick_tokens(scores, us, temperature, top_p, first=True)
            want, want_h = _full_sort_draw(scores, us, temperature, top_p)
            assert torch.equal(got.token, want)
            torch.testing.assert_close(got.nucleus_entropy, want_h)
            p = torch.softmax(scores / temperature, -1).sort(-1, descending=True).values
            wide += int(((p.cumsum(-1) - p) < top_p).sum(-1).gt(candidates).sum())
    assert wide > 100  # the fallback really ran
