"""Sampling: the per-step input built from requests, the exact distribution at a temperature, the
filters' distributions, greedy rows, and min_tokens' banned tokens, on the CPU draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from protos.sampling_params import SamplingParams
from worker_service.batch_inputs import named, unpack
from worker_service.sampling import (
    SamplingArrays,
    SamplingInput,
    build_sampling_input,
    compute_logprobs,
    sample,
)
from worker_service.sequence_table import WorkerSequence

EOS = (2, 3)
VOCAB = 100
P_VALUE = 1e-4


def seq(params: SamplingParams, num_output_tokens: int = 0) -> WorkerSequence:
    """A sequence with a 3-token prompt about to sample its ``num_output_tokens``-th token."""
    prompt = [10, 11, 12]
    return WorkerSequence(0, prompt + [13] * num_output_tokens, len(prompt), params, 0, 0, 0)


def on_cpu(sampling: SamplingInput[np.ndarray]) -> SamplingInput[torch.Tensor]:
    arrays = {name: torch.from_numpy(a) for name, a in named(sampling.arrays).items()}
    return sampling.on(unpack(SamplingArrays, arrays))


def sampling_of(params: list[SamplingParams], seed: int = 0) -> SamplingInput[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return on_cpu(build_sampling_input([seq(p) for p in params], VOCAB, EOS, rng))


def test_the_sampling_input_of_mixed_requests_holds_each_rows_settings() -> None:
    params = [
        SamplingParams(temperature=0.0, top_k=5),  # greedy: its top_k filters nothing
        SamplingParams(temperature=0.8, seed=1234),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.7, min_tokens=4, stop_token_ids=(9, 2)),
        SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=(11,)),
        SamplingParams(min_tokens=2, logprobs=3, seed=7),  # its min_tokens are out
    ]
    seqs = [seq(p, n) for p, n in zip(params, [0, 5, 0, 1, 0, 2])]
    sampling = build_sampling_input(seqs, VOCAB, EOS, np.random.default_rng(7))
    x = sampling.arrays
    assert x.temperatures.dtype == np.float32
    assert x.temperatures.tolist() == pytest.approx([0.0, 0.8, 1.0, 0.7, 1.0, 1.0])
    unseeded = np.random.default_rng(7).integers(0, 2**62, size=6)  # one draw per row
    assert x.seeds.dtype == np.int64
    assert x.seeds.tolist() == [unseeded[0], 1_234_003_707, *unseeded[2:5], 7_000_023]
    assert x.top_ks.tolist() == [5, VOCAB, 20, VOCAB, VOCAB, VOCAB]
    assert x.top_ps.tolist() == pytest.approx([1.0, 1.0, 0.9, 1.0, 1.0, 1.0])
    assert x.min_ps.tolist() == pytest.approx([0.0, 0.0, 0.05, 0.0, 0.0, 0.0])
    none = [-1, -1, -1]
    assert x.banned_ids.tolist() == [none, none, none, [2, 3, 9], [11, -1, -1], none]
    assert not sampling.all_greedy and sampling.needs_filter and sampling.needs_mask
    assert sampling.num_top == 3


def test_greedy_rows_need_no_filter_and_rows_past_min_tokens_no_mask() -> None:
    params = [SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(temperature=0.0)]
    seqs = [seq(params[0]), seq(SamplingParams(temperature=0.0, min_tokens=1), 1)]
    sampling = build_sampling_input(seqs, VOCAB, EOS, np.random.default_rng(0))
    assert sampling.all_greedy and not sampling.needs_filter and not sampling.needs_mask
    assert sampling.arrays.banned_ids.shape == (2, 0) and sampling.num_top == 0


def frequencies(logits: torch.Tensor, params: SamplingParams, num_draws: int) -> torch.Tensor:
    """Token counts of ``num_draws`` unseeded draws from one row of logits."""
    sampling = sampling_of([params] * num_draws)
    tokens = sample(logits.expand(num_draws, -1).contiguous(), sampling)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def assert_follows(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square of ``counts`` against ``probs``; tokens of probability 0 never occur."""
    allowed = probs > 0
    assert counts[~allowed].sum() == 0
    expected = probs[allowed].double() / probs[allowed].sum() * counts.sum()
    assert chisquare(counts[allowed].numpy(), expected.numpy()).pvalue > P_VALUE


LOGITS = torch.tensor([4.0, 3.0, 2.5, 2.0, 1.0, 0.0, -1.0, 1.5])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draws_follow_the_softmax_at_temperature(temperature: float) -> None:
    counts = frequencies(LOGITS, SamplingParams(temperature=temperature), 20_000)
    assert_follows(counts, (LOGITS.double() / temperature).softmax(-1))


def _kept(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The tokens each filter keeps, the slow way: by rank in the sorted distribution."""
    order = probs.argsort(descending=True).tolist()
    keep = torch.zeros(len(probs), dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(order):
        kept = (
            rank < top_k
            and (mass < top_p or top_p == 1)
            and probs[token] >= min_p * probs[order[0]]
        )
        keep[token] = kept or rank == 0
        mass += float(probs[token])
    return keep


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(3, 1.0, 0.0), (VOCAB, 0.8, 0.0), (VOCAB, 1.0, 0.2), (4, 0.9, 0.1)],
)
def test_filtered_draws_follow_the_filtered_softmax(top_k: int, top_p: float, min_p: float) -> None:
    params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = (LOGITS.double() / 0.9).softmax(-1)
    keep = _kept(probs, top_k, top_p, min_p)
    assert 1 < int(keep.sum()) < len(LOGITS)  # each case filters something, not everything
    assert_follows(frequencies(LOGITS, params, 10_000), probs * keep)


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(64, VOCAB)
    tokens = sample(logits, sampling_of([SamplingParams(top_k=1)] * 64))
    assert torch.equal(tokens, logits.argmax(-1))


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(16, VOCAB)
    tokens = sample(logits, sampling_of([SamplingParams(temperature=0.0)] * 16))
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("kernel", [False, True], ids=["cpu_draw", "kernel_draw"])
def test_rows_under_min_tokens_never_sample_eos_or_a_stop_id(kernel: bool) -> None:
    stop = 5
    logits = torch.zeros(VOCAB)
    logits[[EOS[0], stop]] = torch.tensor([12.0, 11.0])  # EOS, then the stop id, win otherwise
    under = [
        SamplingParams(temperature=0.0, min_tokens=8, stop_token_ids=(stop,)),
        SamplingParams(temperature=1.0, min_tokens=8, stop_token_ids=(stop,)),
        SamplingParams(temperature=1.0, min_tokens=8, top_k=3, stop_token_ids=(stop,)),
    ]
    past = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=(stop,))
    eos_ignored = SamplingParams(temperature=0.0, min_tokens=8, ignore_eos=True)
    rows = under * (2 if kernel else 40)
    seqs = [seq(p, 1) for p in rows + [past, eos_ignored]]
    sampling = on_cpu(build_sampling_input(seqs, VOCAB, EOS, np.random.default_rng(0)))
    tokens = sample(logits.expand(len(seqs), -1).contiguous(), sampling, kernel=kernel)
    assert not set(tokens[: len(rows)].tolist()) & {EOS[0], EOS[1], stop}
    assert tokens[len(rows)] == EOS[0] and tokens[len(rows) + 1] == EOS[0]


def test_logprobs_are_those_of_the_raw_distribution() -> None:
    logits = torch.randn(3, VOCAB)
    tokens = torch.tensor([4, 0, 99])
    sampled, top_ids, top_lps = compute_logprobs(logits, tokens, 2)
    expected = logits.log_softmax(-1)
    assert torch.allclose(sampled, expected[torch.arange(3), tokens])
    assert torch.equal(top_ids[:, 0], logits.argmax(-1))
    assert torch.allclose(top_lps, expected.topk(2, dim=-1).values)
