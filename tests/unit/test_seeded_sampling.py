"""A seeded request's tokens do not depend on its batch-mate: beside a plain, a top_k, a top_p and
a min_p mate, the batch size held fixed ([seeded, mate A] against [seeded, mate B]), the seeded
row draws the same tokens, on the CPU draw, on the kernel's draw (the CUDA path, here through
TRITON_INTERPRET) and through the offline engine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nanoserve import LLM
from protos.sampling_params import SamplingParams
from worker_service.batch_inputs import named, unpack
from worker_service.sampling import SamplingArrays, build_sampling_input, sample
from worker_service.sequence_table import WorkerSequence

VOCAB = 64
EOS = (1,)
MATES = {
    "plain": SamplingParams(temperature=0.8),
    "top_k=20": SamplingParams(temperature=0.8, top_k=20),
    "top_p=0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "min_p=0.1": SamplingParams(temperature=0.8, min_p=0.1),
}
SEEDED = {
    "greedy": SamplingParams(temperature=0.0, seed=1234),
    "temperature 0.8": SamplingParams(temperature=0.8, seed=1234),
}


def seeded_tokens(
    seeded: SamplingParams, mate_index: int, num_tokens: int, kernel: bool
) -> list[int]:
    """The seeded row's token at output positions 0, 1, ..., drawn beside the mate. The logits of
    both rows are the same whoever the mate is; the mate's noise is its own. On the CPU draw each
    position is one [seeded, mate] batch; on the kernel's draw, slow to launch under the
    interpreter, one batch holds every position's pair: [seeded 0, mate 0, seeded 1, ...]."""
    pair = [seeded, list(MATES.values())[mate_index]]
    logits = torch.randn(num_tokens, 2, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
    rng = np.random.default_rng(100 + mate_index)  # the mate's unseeded row seeds
    group = num_tokens if kernel else 1
    tokens: list[int] = []
    for first in range(0, num_tokens, group):
        seqs = [
            WorkerSequence(i, [7] * (4 + position), 4, params, i, 0, 0)
            for position in range(first, first + group)
            for i, params in enumerate(pair)
        ]
        sampling = build_sampling_input(seqs, VOCAB, EOS, rng)
        arrays = {k: torch.from_numpy(v) for k, v in named(sampling.arrays).items()}
        rows = logits[first : first + group].reshape(2 * group, VOCAB)
        drawn = sample(rows, sampling.on(unpack(SamplingArrays, arrays)), kernel)
        tokens += drawn[0::2].tolist()
    return tokens


def assert_same_beside_every_mate(runs: dict[str, list[int]], num_tokens: int) -> None:
    reference = runs["plain"]
    for name, tokens in runs.items():
        equal = sum(a == b for a, b in zip(tokens, reference))
        print(f"beside {name}: {equal}/{num_tokens} tokens equal to beside plain")
        assert tokens == reference, name


@pytest.mark.parametrize("seeded", list(SEEDED.values()), ids=list(SEEDED))
def test_a_seeded_row_draws_the_same_tokens_beside_any_mate_on_the_cpu_draw(seeded) -> None:
    runs = {name: seeded_tokens(seeded, i, 48, kernel=False) for i, name in enumerate(MATES)}
    assert_same_beside_every_mate(runs, 48)
    if seeded.temperature > 0:
        assert len(set(runs["plain"])) > 10  # it does sample


def test_a_seeded_row_draws_the_same_tokens_beside_any_mate_on_the_kernel_draw() -> None:
    seeded = SEEDED["temperature 0.8"]
    runs = {name: seeded_tokens(seeded, i, 8, kernel=True) for i, name in enumerate(MATES)}
    assert_same_beside_every_mate(runs, 8)
    assert len(set(runs["plain"])) > 3


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(
        str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=64, max_model_len=128
    )


def test_a_seeded_request_generates_the_same_tokens_beside_any_mate(llm) -> None:
    num_tokens = 24  # the CPU engine steps slowly (reference attention)
    seeded = replace(SEEDED["temperature 0.8"], max_tokens=num_tokens, ignore_eos=True)
    runs = {}
    for name, mate in MATES.items():
        params = [seeded, replace(mate, max_tokens=num_tokens, ignore_eos=True)]
        outputs = llm.generate(["Once upon a time", "The weather"], params, use_tqdm=False)
        runs[name] = outputs[0]["token_ids"]
    assert_same_beside_every_mate(runs, num_tokens)
