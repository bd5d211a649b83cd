"""Bad requests get a gRPC status whose message names the field, and the server keeps serving.

Each bad input is followed by a valid request that must be answered correctly. The scheduler here
runs one sequence at a time with a waiting queue of one, so RESOURCE_EXHAUSTED is reachable.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from nanoserve import launcher
from tests.service_fixtures import (
    BLOCK_SIZE,
    Services,
    generate,
    generation_pb2_grpc,
    greedy,
    pb,
    running_services,
    start_scheduler,
    wait_for,
)

NUM_KV_BLOCKS = 32
MAX_MODEL_LEN = NUM_KV_BLOCKS * BLOCK_SIZE
VOCAB_SIZE = 2048  # the tiny model's (padded) vocabulary


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("error_services")
    args = ["--max-num-seqs", "1", "--max-num-waiting", "1"]
    with running_services(tiny_model_dir, run_dir, NUM_KV_BLOCKS, args) as services:
        yield services


@pytest.fixture(scope="module")
def reference_ids(services: Services) -> list[int]:
    return list(generate(services.stub, text="Hello", sampling=greedy(4))[-1].complete.output_ids)


def assert_still_serving(services: Services, reference_ids: list[int]) -> None:
    done = generate(services.stub, text="Hello", sampling=greedy(4))[-1].complete
    assert list(done.output_ids) == reference_ids


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), error.details()


BAD_REQUESTS = {
    "no_input": (dict(sampling=greedy(4)), ["input"]),
    "empty_text": (dict(text=""), ["text", "empty"]),
    "empty_token_ids": (dict(token_ids=pb.TokenIds(ids=[])), ["token_ids", "empty"]),
    "token_id_outside_vocabulary": (
        dict(token_ids=pb.TokenIds(ids=[5, VOCAB_SIZE])),
        ["token_ids.ids[1]", str(VOCAB_SIZE)],
    ),
    "prompt_plus_max_tokens_beyond_max_model_len": (
        dict(token_ids=pb.TokenIds(ids=[5] * 100), sampling=greedy(MAX_MODEL_LEN - 99)),
        ["max_tokens", "max_model_len", str(MAX_MODEL_LEN)],
    ),
    "prompt_beyond_max_model_len": (
        dict(token_ids=pb.TokenIds(ids=[5] * (MAX_MODEL_LEN + 1))),
        ["max_model_len", str(MAX_MODEL_LEN)],
    ),
    "negative_temperature": (dict(text="Hi", sampling=pb.SamplingParams(temperature=-0.5)), ["sampling.temperature", ">= 0"]),
    "top_p_above_one": (dict(text="Hi", sampling=pb.SamplingParams(top_p=1.5)), ["sampling.top_p", "(0, 1]"]),
    "top_k_zero": (dict(text="Hi", sampling=pb.SamplingParams(top_k=0)), ["sampling.top_k", "-1 or >= 1"]),
    "min_p_above_one": (dict(text="Hi", sampling=pb.SamplingParams(min_p=2.0)), ["sampling.min_p", "[0, 1]"]),
    "zero_max_tokens": (dict(text="Hi", sampling=pb.SamplingParams(max_tokens=0)), ["sampling.max_tokens", ">= 1"]),
    "min_tokens_above_max_tokens": (
        dict(text="Hi", sampling=pb.SamplingParams(max_tokens=4, min_tokens=5)),
        ["sampling.min_tokens", "max_tokens"],
    ),
    "too_many_logprobs": (dict(text="Hi", sampling=pb.SamplingParams(logprobs=21)), ["sampling.logprobs", "[0, 20]"]),
    "seed_too_large": (dict(text="Hi", sampling=pb.SamplingParams(seed=2**63)), ["sampling.seed", "2**63"]),
    "stop_token_id_outside_vocabulary": (
        dict(text="Hi", sampling=pb.SamplingParams(stop_token_ids=[VOCAB_SIZE])),
        ["sampling.stop_token_ids", str(VOCAB_SIZE)],
    ),
    "empty_stop_string": (dict(text="Hi", sampling=pb.SamplingParams(stop=[""])), ["sampling.stop"]),
    "unknown_chat_role": (
        dict(chat=pb.Chat(messages=[pb.ChatMessage(role="wizard", content="hi")])),
        ["chat.messages", "wizard"],
    ),
    "empty_chat": (dict(chat=pb.Chat()), ["chat.messages"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field(
    services: Services, reference_ids: list[int], case: str
) -> None:
    request, words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        generate(services.stub, **request)
    assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert_still_serving(services, reference_ids)


def test_a_live_request_id_cannot_be_reused(services: Services, reference_ids: list[int]) -> None:
    request = pb.GenerateRequest(
        request_id="twice", text="Hi", sampling=greedy(400, ignore_eos=True), stream=True
    )
    first = services.stub.Generate(request, timeout=60)
    next(first)
    with pytest.raises(grpc.RpcError) as error:
        generate(services.stub, request_id="twice", text="Hi")
    assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, "request_id", "twice")
    first.cancel()
    assert_still_serving(services, reference_ids)


def test_abort_of_an_unknown_id_is_not_found(services: Services, reference_ids: list[int]) -> None:
    with pytest.raises(grpc.RpcError) as error:
        services.stub.Abort(pb.AbortRequest(request_ids=["no-such-request"]), timeout=5)
    assert_status(error.value, grpc.StatusCode.NOT_FOUND, "request_ids", "no-such-request")
    assert_still_serving(services, reference_ids)


def test_a_full_waiting_queue_is_resource_exhausted(
    services: Services, reference_ids: list[int]
) -> None:
    long = dict(text="Hi", sampling=greedy(400, ignore_eos=True), stream=True)
    running = services.stub.Generate(pb.GenerateRequest(request_id="running", **long), timeout=60)
    next(running)  # running: max_num_seqs is 1
    waiting = services.stub.Generate(pb.GenerateRequest(request_id="waiting", **long), timeout=60)
    wait_for(lambda: services.status().num_waiting_requests == 1, 5, "a waiting request")
    try:
        with pytest.raises(grpc.RpcError) as error:
            generate(services.stub, text="Hi", sampling=greedy(2))
        assert_status(error.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue", "1")
    finally:
        running.cancel()
        waiting.cancel()
    idle = lambda: (s := services.status()).num_running_requests + s.num_waiting_requests == 0  # noqa: E731
    wait_for(idle, 5, "the cancelled requests to go")
    assert_still_serving(services, reference_ids)


def test_without_a_worker_requests_are_unavailable_and_readiness_is_off(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    nobody = f"127.0.0.1:{launcher.free_port()}"
    scheduler = start_scheduler(tiny_model_dir, [nobody], tmp_path)
    try:
        with grpc.insecure_channel(scheduler.addr) as channel:
            with pytest.raises(TimeoutError):
                launcher.wait_until_serving(scheduler.addr, 1.5)
            stub = generation_pb2_grpc.GenerationStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                generate(stub, text="Hello", sampling=greedy(4))
            assert_status(error.value, grpc.StatusCode.UNAVAILABLE, "worker")
            launcher.wait_until_serving(scheduler.addr, 5, service="")  # alive, not ready
    finally:
        scheduler.stop()
