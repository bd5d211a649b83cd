"""Sampler: exact distribution at temperature 1, filters, greedy, per-request seeds."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from worker_service.sampler import SamplingBatch, sample


def batch_of(n: int, *, temperature=1.0, top_k=None, top_p=1.0, min_p=0.0, seeds=None, vocab=8):
    return SamplingBatch(
        temperatures=torch.full((n,), float(temperature)),
        top_ks=torch.full((n,), top_k or vocab, dtype=torch.int64),
        top_ps=torch.full((n,), float(top_p)),
        min_ps=torch.full((n,), float(min_p)),
        seeds=seeds or [None] * n,
        output_indices=[0] * n,
        all_greedy=temperature == 0,
        needs_filter=top_k is not None or top_p < 1 or min_p > 0,
    )


def test_temperature_one_matches_the_softmax_distribution() -> None:
    torch.manual_seed(0)
    vocab, draws = 8, 40_000
    logits = torch.randn(vocab)
    gen = torch.Generator().manual_seed(1234)
    tokens = sample(logits.expand(draws, vocab).clone(), batch_of(draws, vocab=vocab), gen)
    observed = torch.bincount(tokens, minlength=vocab).double()
    expected = logits.double().softmax(-1) * draws
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 0.001


def test_temperature_scales_the_distribution() -> None:
    vocab, draws = 6, 30_000
    logits = torch.linspace(-1, 1, vocab)
    gen = torch.Generator().manual_seed(7)
    tokens = sample(
        logits.expand(draws, vocab).clone(), batch_of(draws, temperature=0.5, vocab=vocab), gen
    )
    observed = torch.bincount(tokens, minlength=vocab).double()
    expected = (logits.double() / 0.5).softmax(-1) * draws
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 0.001


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(64, 50)
    tokens = sample(logits, batch_of(64, top_k=1, vocab=50), torch.Generator().manual_seed(0))
    assert torch.equal(tokens, logits.argmax(-1))


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(16, 50)
    assert torch.equal(sample(logits, batch_of(16, temperature=0, vocab=50)), logits.argmax(-1))


def test_top_k_top_p_min_p_only_keep_allowed_tokens() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).expand(2000, 6).clone()
    gen = torch.Generator().manual_seed(3)
    assert sample(logits, batch_of(2000, top_k=2, vocab=6), gen).max() <= 1
    probs = logits[0].softmax(-1)  # top_p=0.8 keeps the smallest prefix reaching 0.8
    keep = int((probs.cumsum(0) - probs < 0.8).sum())
    assert sample(logits, batch_of(2000, top_p=0.8, vocab=6), gen).max() < keep
    keep_min_p = int((probs >= 0.2 * probs[0]).sum())
    assert sample(logits, batch_of(2000, min_p=0.2, vocab=6), gen).max() < keep_min_p


def test_seeded_row_does_not_depend_on_its_neighbours() -> None:
    logits = torch.randn(1, 100)
    alone = sample(logits, batch_of(1, seeds=[42], vocab=100), torch.Generator().manual_seed(0))
    crowd = torch.cat([torch.randn(5, 100), logits, torch.randn(5, 100)])
    seeds = [None] * 5 + [42] + [None] * 5
    together = sample(crowd, batch_of(11, seeds=seeds, vocab=100), torch.Generator().manual_seed(9))
    assert together[5] == alone[0]
