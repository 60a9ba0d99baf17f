"""The seeded top-p sampler: right distribution, same nucleus as transformers, reproducible."""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch
from transformers import TopPLogitsWarper

from qsae.lm.sampling import SeededTopPSampler, empirical_entropy, entropy_from_logits, uniform


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
