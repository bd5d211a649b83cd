"""n > 1 parallel samples (vLLM's engine protocol): each sample's seed stays in the range the
request's seed was checked against, so a seed near the top cannot take a worker down."""

from __future__ import annotations

from protos.sampling_params import SamplingParams
from scheduler_service.request_checks import MAX_SEED
from scheduler_service.vllm_wire import parallel_samples


def test_seeded_samples_differ_and_stay_in_the_seed_range() -> None:
    samples = parallel_samples("r", SamplingParams(seed=MAX_SEED - 2), 4)
    assert [request_id for request_id, _ in samples] == ["0_r", "1_r", "2_r", "3_r"]
    assert [p.seed for _, p in samples] == [MAX_SEED - 2, MAX_SEED - 1, 0, 1]


def test_one_sample_keeps_the_request_as_it_is() -> None:
    params = SamplingParams(seed=7)
    assert parallel_samples("r", params, 1) == [("r", params)]
