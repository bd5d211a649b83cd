"""Penalties and logit bias on the worker: the vectorised adjustment against a per-token torch
reference, repetition penalty against transformers' RepetitionPenaltyLogitsProcessor, the token
still in flight read from the device, and steps without them left alone (nothing built)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from protos.sampling_params import SamplingParams
from protos.step_plan import PENDING
from worker_service.batch_inputs import named, unpack
from worker_service.logit_adjust import (
    AdjustArrays,
    apply_adjust,
    apply_adjust_ref,
    build_adjust_arrays,
    resolve_pending,
)
from worker_service.sampling import SamplingArrays, build_sampling_input, sample
from worker_service.sequence_table import WorkerSequence

VOCAB = 50
EOS = (2,)


def seq(params: SamplingParams, prompt: list[int], output: list[int], seq_id: int = 0):
    return WorkerSequence(seq_id, prompt + output, len(prompt), params, 0, 0, 0)


def on_cpu(arrays: AdjustArrays[np.ndarray]) -> AdjustArrays[torch.Tensor]:
    return unpack(AdjustArrays, {k: torch.from_numpy(v) for k, v in named(arrays).items()})


def adjusted(logits: torch.Tensor, seqs: list[WorkerSequence], rows: list[int]) -> torch.Tensor:
    return apply_adjust(logits, on_cpu(build_adjust_arrays(seqs, rows, VOCAB, {})))


MIXED = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(frequency_penalty=0.6, presence_penalty=-0.4),
    SamplingParams(logit_bias={3: 5.0, 40: -100.0, 7: 0.25}),
    SamplingParams(
        repetition_penalty=0.6, frequency_penalty=-1.5, presence_penalty=2.0, logit_bias={9: -3.0}
    ),
    SamplingParams(repetition_penalty=1.3),  # no output yet: its prompt alone
]


def mixed_seqs(rng: np.random.Generator) -> list[WorkerSequence]:
    """Each row a history with repeats, in prompt and output, of varied lengths."""
    out = []
    for i, params in enumerate(MIXED):
        prompt = rng.integers(0, 12, size=3 + 2 * i).tolist()
        output = rng.integers(5, 20, size=0 if i == 4 else 2 + 3 * i).tolist()
        out.append(seq(params, prompt, output, seq_id=i))
    return out


def test_penalties_and_bias_equal_the_per_token_reference() -> None:
    rng = np.random.default_rng(0)
    seqs = mixed_seqs(rng)
    logits = torch.randn(len(seqs), VOCAB) * 3
    got = adjusted(logits, seqs, list(range(len(seqs))))
    expected = apply_adjust_ref(logits, seqs, {i: s.token_ids for i, s in enumerate(seqs)})
    assert torch.allclose(got, expected, atol=1e-5)
    changed = (expected != logits).any(dim=-1)
    assert changed.all()  # every row's settings do something: the comparison is not vacuous


def test_only_the_adjusted_rows_change() -> None:
    rng = np.random.default_rng(1)
    plain = seq(SamplingParams(), [1, 2, 3], [4, 4])
    seqs = [plain, *mixed_seqs(rng)[:2], plain]
    logits = torch.randn(len(seqs), VOCAB)
    got = adjusted(logits, seqs, [1, 2])
    assert torch.equal(got[[0, 3]], logits[[0, 3]])
    assert not torch.equal(got[[1, 2]], logits[[1, 2]])


@pytest.mark.parametrize("penalty", [1.2, 2.0, 0.5])
def test_repetition_penalty_equals_transformers_processor(penalty: float) -> None:
    rng = np.random.default_rng(2)
    seqs = [
        seq(SamplingParams(repetition_penalty=penalty), rng.integers(0, VOCAB, 9).tolist(), out)
        for out in (rng.integers(0, VOCAB, 6).tolist(), [])
    ]
    logits = torch.randn(len(seqs), VOCAB) * 4
    got = adjusted(logits, seqs, [0, 1])
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row, s in enumerate(seqs):
        input_ids = torch.tensor([s.token_ids])
        expected = processor(input_ids, logits[row : row + 1].clone())
        assert torch.allclose(got[row], expected[0], atol=1e-6)


def test_the_output_token_in_flight_is_read_from_prev_tokens() -> None:
    """A row whose newest token is PENDING counts the value the device holds for it."""
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5)
    in_flight = seq(params, [1, 2], [7, 7, PENDING], seq_id=42)
    known = seq(params, [1, 2], [7, 7, 11], seq_id=42)
    prev_tokens = torch.tensor([0, 0, 0, 11, 0])  # row 3 holds seq 42's sampled token
    host = build_adjust_arrays([in_flight], [0], VOCAB, {42: 3})
    assert host.pending_rows.tolist() == [3]
    x = resolve_pending(on_cpu(host), prev_tokens)
    prev_tokens[3] = 99  # the next step's draw overwrites it: the resolved ids keep their value
    logits = torch.randn(1, VOCAB)
    expected = apply_adjust_ref(logits, [known], {0: known.token_ids})
    assert torch.allclose(apply_adjust(logits, x), expected, atol=1e-6)
    assert expected[0, 11] != logits[0, 11]


def test_a_step_without_penalties_builds_nothing_and_needs_only_the_kernel() -> None:
    seqs = [seq(SamplingParams(temperature=0.8), [1, 2], [3]), seq(SamplingParams(), [4], [])]
    sampling = build_sampling_input(seqs, VOCAB, EOS, np.random.default_rng(0))
    assert sampling.adjusted_rows == () and sampling.adjust is None
    assert not sampling.needs_more_than_the_kernel
    with_one = seqs + [seq(SamplingParams(presence_penalty=0.1), [1], [])]
    sampling = build_sampling_input(with_one, VOCAB, EOS, np.random.default_rng(0))
    assert sampling.adjusted_rows == (2,) and sampling.needs_more_than_the_kernel


def test_sample_applies_them_to_greedy_rows_before_the_argmax() -> None:
    """A strong repetition penalty turns a greedy row away from a token it has seen; a strong
    logit bias picks its token; a plain greedy row beside them keeps its argmax."""
    logits = torch.zeros(3, VOCAB)
    logits[:, 5], logits[:, 6] = 4.0, 3.0  # 5 wins unpenalized
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.0, logit_bias={30: 10.0}),
        SamplingParams(temperature=0.0),
    ]
    seqs = [seq(p, [5, 1], [], seq_id=i) for i, p in enumerate(params)]
    host = build_sampling_input(seqs, VOCAB, EOS, np.random.default_rng(0))
    arrays = unpack(SamplingArrays, {k: torch.from_numpy(v) for k, v in named(host.arrays).items()})
    rows = list(host.adjusted_rows)
    sampling = host.on(arrays).with_adjust(on_cpu(build_adjust_arrays(seqs, rows, VOCAB, {})))
    assert sample(logits, sampling).tolist() == [6, 30, 5]


def test_both_wires_carry_penalties_and_bias_to_the_worker() -> None:
    """nanoserve.v1 SamplingParams -> SamplingParams -> the worker's message and back."""
    from protos.nanoserve.v1 import generation_pb2 as public_pb
    from protos.nanoserve.worker.v1 import worker_pb2
    from protos.wire_worker import params_from_pb, params_to_pb
    from scheduler_service.wire_public import sampling_from_pb

    msg = public_pb.SamplingParams(
        presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25
    )
    msg.logit_bias.update({3: 2.5, 17: -100.0})
    params = sampling_from_pb(msg)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.repetition_penalty == 1.25 and params.logit_bias == {3: 2.5, 17: -100.0}
    wire = worker_pb2.SamplingParams.FromString(params_to_pb(params).SerializeToString())
    assert params_from_pb(wire) == params
    unset = sampling_from_pb(public_pb.SamplingParams())
    assert unset.repetition_penalty == 1.0 and not unset.adjusts_logits


@pytest.mark.gpu
def test_on_cuda_the_adjustment_equals_the_reference() -> None:
    rng = np.random.default_rng(5)
    seqs = mixed_seqs(rng)
    logits = torch.randn(len(seqs), VOCAB) * 3
    host = build_adjust_arrays(seqs, list(range(len(seqs))), VOCAB, {})
    arrays = unpack(AdjustArrays, {k: torch.from_numpy(v).cuda() for k, v in named(host).items()})
    got = apply_adjust(logits.cuda().bfloat16(), arrays).cpu()
    expected = apply_adjust_ref(
        logits.bfloat16(), seqs, {i: s.token_ids for i, s in enumerate(seqs)}
    )
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-4)
