"""Losing the worker: in-flight requests fail fast with UNAVAILABLE, readiness turns off, and a
worker restarted on the same address is picked up with a fresh session and correct output."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanoserve import launcher
from tests.service_fixtures import (
    generate,
    greedy,
    pb,
    running_services,
    start_worker,
    wait_for,
)

NUM_KV_BLOCKS = 32
LOSS_DEADLINE_S = 5.0  # in-flight requests must fail within this long after the kill


def readiness(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="nanoserve.v1.Generation")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status


def stream_until_error(stream: grpc.Call, errors: list[tuple[grpc.StatusCode, float]]) -> None:
    try:
        for _ in stream:
            pass
    except grpc.RpcError as e:
        errors.append((e.code(), time.monotonic()))


def test_killed_worker_fails_requests_then_a_restarted_one_serves_again(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with running_services(tiny_model_dir, tmp_path, NUM_KV_BLOCKS) as services:
        stub = services.stub
        expected = generate(stub, text="Once upon a time", sampling=greedy(8))[-1].complete
        sampling = greedy(400, ignore_eos=True)
        streams = [
            stub.Generate(pb.GenerateRequest(text=f"story {i}", sampling=sampling, stream=True), timeout=60)
            for i in range(4)
        ]  # fmt: skip
        for stream in streams:
            next(stream)  # every one is running
        errors: list[tuple[grpc.StatusCode, float]] = []
        readers = [threading.Thread(target=stream_until_error, args=(s, errors)) for s in streams]
        for reader in readers:
            reader.start()

        services.worker.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for reader in readers:
            reader.join(LOSS_DEADLINE_S + 5)
        assert [code for code, _ in errors] == [grpc.StatusCode.UNAVAILABLE] * 4
        assert max(t for _, t in errors) - killed_at < LOSS_DEADLINE_S
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: readiness(services.channel) == not_serving, LOSS_DEADLINE_S, "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as error:
            generate(stub, text="Once upon a time", sampling=greedy(8))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE

        services.worker.stop()
        restarted = start_worker(
            tiny_model_dir, tmp_path, NUM_KV_BLOCKS, port=services.worker.port, name="worker2"
        )
        try:
            launcher.wait_until_serving(services.addr, 30)
            again = generate(stub, text="Once upon a time", sampling=greedy(8))[-1].complete
            assert again.output_ids == expected.output_ids
            assert again.text == expected.text
            status = services.status()
            assert status.ready and status.free_blocks == status.total_blocks == NUM_KV_BLOCKS
        finally:
            restarted.stop()
