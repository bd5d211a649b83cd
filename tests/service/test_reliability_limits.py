"""Overload and misbehaving clients: every limit answers at once, and nothing leaks.

One server for the module, with small limits so each is reachable: two running sequences, a
waiting queue of four, four live streams, prompts of 200 tokens, max_tokens of 400, requests of
64 KiB and a stream buffer of 64 step outputs. After each test every KV block must be free.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.service_fixtures import (
    ROOT,
    Services,
    generate,
    generation_pb2_grpc,
    greedy,
    kv_cache_clean_after_each_test,
    pb,
    running_services,
    wait_for,
)

NUM_KV_BLOCKS = 64
MAX_NUM_STREAMS = 4
LIMITS = {
    "--max-num-seqs": 2,
    "--max-num-waiting": 4,
    "--max-num-streams": MAX_NUM_STREAMS,
    "--max-prompt-tokens": 200,
    "--max-output-tokens": 400,
    "--max-message-bytes": 64 << 10,
    "--max-stream-buffer": 64,
}
AT_ONCE_S = 1.0  # a refusal must not wait for capacity
LONG = greedy(400, ignore_eos=True)
# A client whose receive window is tiny and never grows: once it stops reading, the server's
# writes block after a few chunks, as they would for a stalled client over a real network.
STALLED_CHANNEL_OPTIONS = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]

_ = kv_cache_clean_after_each_test
pytestmark = pytest.mark.usefixtures("kv_cache_clean_after_each_test")


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    args = [str(a) for flag_value in LIMITS.items() for a in flag_value]
    run_dir = tmp_path_factory.mktemp("limits")
    with running_services(tiny_model_dir, run_dir, NUM_KV_BLOCKS, args) as services:
        yield services


def refusal(services: Services, **request: object) -> tuple[grpc.RpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        generate(services.stub, **request)
    return error.value, time.monotonic() - started


def assert_serves(services: Services) -> None:
    done = generate(services.stub, text="Hello", sampling=greedy(4, ignore_eos=True))[-1]
    assert done.complete.usage.completion_tokens == 4


def test_a_prompt_past_max_prompt_tokens_is_invalid_argument(services: Services) -> None:
    error, _ = refusal(services, token_ids=pb.TokenIds(ids=[5] * 201))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "201 tokens" in error.details() and "--max-prompt-tokens" in error.details()
    assert_serves(services)


def test_max_tokens_past_max_output_tokens_is_invalid_argument(services: Services) -> None:
    error, _ = refusal(services, text="Hi", sampling=greedy(401))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens=401" in error.details() and "400" in error.details()
    assert_serves(services)


@pytest.mark.parametrize(
    "stop", [["a"] * 65, ["x" * 1025]], ids=["too_many_stop_strings", "too_long_stop_string"]
)
def test_stop_lists_past_their_limits_are_invalid_argument(
    services: Services, stop: list[str]
) -> None:
    error, _ = refusal(services, text="Hi", sampling=greedy(4, stop=stop))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.stop" in error.details()
    assert_serves(services)


def test_a_request_past_max_message_bytes_is_refused_before_it_is_read(
    services: Services,
) -> None:
    error, took = refusal(services, text="word " * 20_000)  # ~100 KB > 64 KiB
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert took < AT_ONCE_S
    assert_serves(services)


def test_streams_past_max_num_streams_are_resource_exhausted_at_once(
    services: Services,
) -> None:
    request = pb.GenerateRequest(text="long", sampling=LONG, stream=True)
    streams = [services.stub.Generate(request, timeout=60) for _ in range(MAX_NUM_STREAMS)]
    codes: list[grpc.StatusCode] = []
    readers = [threading.Thread(target=read_until_error, args=(s, codes)) for s in streams]
    for reader in readers:
        reader.start()
    try:
        wait_for(lambda: services.status().num_waiting_requests == 2, 5, "2 waiting requests")
        error, took = refusal(services, text="one too many", sampling=greedy(2))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-num-streams 4" in error.details()
        assert took < AT_ONCE_S
    finally:
        for stream in streams:
            stream.cancel()
        for reader in readers:
            reader.join(5)
    assert codes == [grpc.StatusCode.CANCELLED] * MAX_NUM_STREAMS
    assert_serves(services)


def read_until_error(stream: grpc.Call, codes: list[grpc.StatusCode]) -> None:
    try:
        for _ in stream:
            pass
        codes.append(grpc.StatusCode.OK)
    except grpc.RpcError as e:
        codes.append(e.code())


def test_a_client_that_stops_reading_is_aborted_without_stalling_others(
    services: Services,
) -> None:
    with grpc.insecure_channel(services.addr, options=STALLED_CHANNEL_OPTIONS) as channel:
        stalled = generation_pb2_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(
                request_id="stalled", text="x", stream=True, sampling=greedy(400, logprobs=20)
            ),
            timeout=60,
        )
        next(stalled)  # then never read again (until the end)
        others = [
            generate(services.stub, text=f"other {i}", sampling=greedy(64, ignore_eos=True))
            for i in range(2)
        ]
        for responses in others:
            assert responses[-1].complete.usage.completion_tokens == 64
        wait_for(lambda: services.status().num_running_requests == 0, 10, "the stalled abort")
        with pytest.raises(grpc.RpcError) as error:
            for _ in stalled:
                pass
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-stream-buffer 64" in error.value.details()


VANISHING_CLIENT = """
import sys, grpc
from protos.nanoserve.v1 import generation_pb2 as pb, generation_pb2_grpc
stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(sys.argv[1]))
sampling = pb.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
stream = stub.Generate(pb.GenerateRequest(text="gone", sampling=sampling, stream=True))
next(stream)
print("streaming", flush=True)
sys.stdin.read()
"""


def test_a_client_killed_mid_stream_has_its_request_aborted(services: Services) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, services.addr],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == b"streaming\n"
        assert services.status().num_running_requests == 1
        client.send_signal(signal.SIGKILL)
        client.wait(5)
        wait_for(lambda: services.status().num_running_requests == 0, 5, "the abort")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert_serves(services)
