"""The one-pass Gumbel-max sampling kernel draws from softmax(logits / T), row by row.

The kernel is checked token for token against ``sample_tokens_ref`` (the same draw in torch,
Philox numbers included), on rows with filters' -inf logits too. The reference then carries the
statistical claims: the CPU interpreter runs one kernel program in ~60 ms, far too slow for the
thousands of draws a chi-square test needs, while the reference draws them in milliseconds. On a
GPU the chi-square tests run on the kernel's own draws.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from scipy.stats import chisquare

from kernels.sample_tokens import gumbel_noise, sample_tokens, sample_tokens_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_DRAWS = 6000
P_VALUE = 1e-4  # a correct sampler fails this once in 10,000 seeds; the seeds here are fixed


def draws(sampler, logits: torch.Tensor, temperature: float, num_draws: int) -> torch.Tensor:
    """``num_draws`` tokens from one row of logits, each with its own seed."""
    rows = logits.expand(num_draws, -1).contiguous().to(DEVICE)
    temps = torch.full((num_draws,), temperature, device=DEVICE)
    seeds = torch.arange(num_draws, device=DEVICE) * 7919 + 13
    return sampler(rows, temps, seeds).cpu()


def chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the token counts against ``probs``; tokens of probability 0 must not occur."""
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    allowed = probs > 0
    assert counts[~allowed].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[allowed].double() * len(tokens)
    expected *= counts[allowed].sum() / expected.sum()  # exact totals for scipy
    return float(chisquare(counts[allowed].numpy(), expected.numpy()).pvalue)


LOGITS = torch.tensor([1.2, -0.3, 0.4, 2.0, -1.5, 0.0, 0.9, -0.7])
KEEP = torch.tensor([True, False, True, True, False, False, True, False])


def test_temperature_zero_rows_take_the_argmax() -> None:
    logits = torch.randn(6, 3000, device=DEVICE)
    temps = torch.zeros(6, device=DEVICE)
    seeds = torch.arange(6, device=DEVICE)
    assert torch.equal(sample_tokens(logits, temps, seeds), logits.argmax(-1))


@pytest.mark.parametrize(("vocab", "chunk_size"), [(8, 16), (200, 64)])
def test_the_kernel_draws_the_reference_tokens(vocab: int, chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=gen) * 2
    temps = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.0, 1.5, 0.8, 2.0])
    seeds = torch.randint(0, 2**62, (8,), generator=gen)
    args = [t.to(DEVICE) for t in (logits, temps, seeds)]
    assert torch.equal(sample_tokens(*args, chunk_size=chunk_size).cpu(), sample_tokens_ref(*args))


def test_rows_masked_to_a_few_tokens_draw_only_those_even_across_empty_chunks() -> None:
    vocab, chunk_size = 256, 64
    logits = torch.full((6, vocab), float("-inf"))
    allowed = [[3], [70, 200], [0, 255], [130, 131, 140], [250], [1, 64, 128, 192]]
    for row, ids in enumerate(allowed):  # rows 0, 1, 4: whole chunks are -inf
        logits[row, ids] = torch.linspace(0.0, 1.0, len(ids))
    temps = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.0, 1.0])
    seeds = torch.tensor([5, 6, 7, 8, 9, 10]) * 1_000_003
    args = [t.to(DEVICE) for t in (logits, temps, seeds)]
    tokens = sample_tokens(*args, chunk_size=chunk_size).cpu()
    assert all(token in ids for token, ids in zip(tokens.tolist(), allowed))
    assert torch.equal(tokens, sample_tokens_ref(*args))


def test_draws_follow_the_softmax_at_temperature() -> None:
    for temperature in (0.7, 1.3):
        tokens = draws(sample_tokens_ref, LOGITS, temperature, NUM_DRAWS)
        assert chi_square_p(tokens, (LOGITS / temperature).softmax(-1)) > P_VALUE


def test_draws_over_filtered_logits_follow_the_filtered_softmax() -> None:
    filtered = LOGITS.masked_fill(~KEEP, float("-inf"))
    tokens = draws(sample_tokens_ref, filtered, 0.8, NUM_DRAWS)
    assert chi_square_p(tokens, (filtered / 0.8).softmax(-1)) > P_VALUE


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


def test_tokens_land_in_the_tensor_given_and_nowhere_else() -> None:
    logits = torch.randn(3, 300, device=DEVICE)
    logits[0, [10, 250]] = 40.0  # a tie across chunks in the row picked from the chunks
    temps = torch.tensor([0.0, 1.0, 0.5], device=DEVICE)
    seeds = torch.tensor([7, 8, 9], device=DEVICE)
    buffer = torch.full((5,), -7, dtype=torch.int64, device=DEVICE)
    got = sample_tokens(logits, temps, seeds, chunk_size=64, out=buffer[1:4])
    assert got.data_ptr() == buffer[1:4].data_ptr()
    assert torch.equal(buffer[1:4].cpu(), sample_tokens_ref(logits, temps, seeds).cpu())
    assert buffer[1] == 10 and buffer[0] == -7 and buffer[4] == -7
    with pytest.raises(ValueError, match="out"):
        sample_tokens(logits, temps, seeds, out=buffer[:2])


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="seeds"):
        sample_tokens(
            torch.randn(2, 10, device=DEVICE),
            torch.ones(2, device=DEVICE),
            torch.ones(3, dtype=torch.int64, device=DEVICE),
        )


@triton.jit
def _noise_kernel(u_ptr, out_ptr, n, FAST_LOG: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    uniform = tl.load(u_ptr + offsets, mask=mask, other=0.5)
    tl.store(out_ptr + offsets, gumbel_noise(uniform, FAST_LOG), mask=mask)


def _noise_error(device: str) -> float:
    """Largest distance of the kernel's noise from ``-log(-log(u))`` in float64, over every
    float32 u within 1/64 of 1 (where ``-log(u)`` is tiny) and a spread over (0, 1)."""
    near_one = 1.0 - torch.arange(1, 2**18 + 1, dtype=torch.float64) * 2.0**-24
    spread = torch.linspace(2.0**-31, 1.0 - 2.0**-24, 100_000, dtype=torch.float64)
    uniform = torch.cat([near_one, spread]).float()
    out = torch.empty_like(uniform, device=device)
    n, block = len(uniform), 4096
    fast = device == "cuda"
    _noise_kernel[(triton.cdiv(n, block),)](uniform.to(device), out, n, FAST_LOG=fast, BLOCK=block)
    exact = -torch.log(-torch.log(uniform.double()))
    return float((out.cpu().double() - exact).abs().max())


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the fast-log test below runs instead")
def test_the_noise_is_exact_to_float32_rounding_up_to_u_near_one() -> None:
    assert _noise_error("cpu") <= 2e-6


@pytest.mark.gpu
def test_the_fast_log_noise_stays_within_its_bound_on_gpu() -> None:
    """The hardware log's absolute error (2^-21.4 near 1) is larger than ``-log(u)`` itself as u
    nears 1: without the series there the noise would be far off, infinite or NaN."""
    assert _noise_error("cuda") <= 3e-5


def _full_vocabulary_logits(vocab: int = 151936) -> tuple[torch.Tensor, list[int]]:
    """bf16 logits with five likely tokens in different chunks and a low floor elsewhere."""
    heavy = [5, 4100, 70000, 151000, vocab - 1]
    logits = torch.full((vocab,), -8.0)
    logits[heavy] = torch.tensor([6.0, 5.5, 5.0, 4.5, 4.0])
    return logits.to(torch.bfloat16), heavy


def _binned(tokens: torch.Tensor, probs: torch.Tensor, heavy: list[int]) -> float:
    """Chi-square p-value over the heavy tokens and one bin for all the others."""
    bins = torch.full((len(probs),), len(heavy), dtype=torch.int64)
    bins[heavy] = torch.arange(len(heavy))
    grouped = torch.zeros(len(heavy) + 1, dtype=torch.float64).index_add_(0, bins, probs.double())
    return chi_square_p(bins[tokens], grouped)


@pytest.mark.gpu
def test_full_vocabulary_draws_follow_the_softmax_on_gpu() -> None:
    logits, heavy = _full_vocabulary_logits()
    for temperature in (0.6, 1.0):
        tokens = draws(sample_tokens, logits, temperature, 4096)
        probs = (logits.double() / temperature).softmax(-1)
        print(f"T={temperature}: chi-square p = {_binned(tokens, probs, heavy):.3g}")
        assert _binned(tokens, probs, heavy) > P_VALUE
    filtered = logits.masked_fill(logits < 0, float("-inf"))  # only the heavy five are left
    tokens = draws(sample_tokens, filtered, 0.8, 4096)
    assert _binned(tokens, (filtered.double() / 0.8).softmax(-1), heavy) > P_VALUE


@pytest.mark.gpu
def test_full_vocabulary_kernel_agrees_with_its_reference_on_gpu() -> None:
    rows = 16
    logits = torch.randn(rows, 151936, device="cuda", dtype=torch.bfloat16) * 3
    temps = torch.linspace(0.0, 1.5, rows, device="cuda")
    seeds = torch.arange(rows, device="cuda") * 1_000_003
    same = (sample_tokens(logits, temps, seeds) == sample_tokens_ref(logits, temps, seeds)).sum()
    assert same >= rows - 1  # a near-tie may break the other way under the GPU's log
