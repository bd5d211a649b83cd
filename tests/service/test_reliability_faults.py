"""Faults and shutdown: a hung worker, a scheduler restarted against live workers, SIGTERM drain.

One worker for the module (the faults here never kill it); each test starts its own scheduler.
- A worker that stops answering without dying (SIGSTOP) is lost once a step passes
  ``--step-timeout``: in-flight requests end UNAVAILABLE, readiness drops, and service resumes
  with a fresh session once the worker answers again (SIGCONT).
- A scheduler killed with -9 and started again gets a fresh session from the same worker and
  serves the same greedy output, with every KV block free.
- SIGTERM drains: readiness NOT_SERVING at once, new requests UNAVAILABLE, in-flight ones finish,
  exit status 0; past ``--drain-timeout`` what is left is cancelled and the exit is still 0.
(Killing the worker with -9 is tests/service/test_grpc_worker_loss.py.)
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanoserve import launcher
from tests.service_fixtures import (
    Services,
    assert_kv_cache_clean,
    generate,
    greedy,
    pb,
    start_scheduler,
    start_worker,
    wait_for,
)

NUM_KV_BLOCKS = 64
STEP_TIMEOUT_S = 2.0
PROMPT = "Once upon a time"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return launcher.secret_env()


@pytest.fixture(scope="module")
def worker(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, worker_env: dict[str, str]
) -> Iterator[launcher.ServiceProcess]:
    run_dir = tmp_path_factory.mktemp("faults_worker")
    process = start_worker(tiny_model_dir, run_dir, NUM_KV_BLOCKS, env=worker_env)
    yield process
    process.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
    process.stop()


@contextmanager
def scheduler(
    tiny_model_dir: Path,
    worker: launcher.ServiceProcess,
    env: dict[str, str],
    run_dir: Path,
    *args: str,
) -> Iterator[Services]:
    process = start_scheduler(tiny_model_dir, [worker.addr], run_dir, args, env)
    try:
        launcher.wait_until_serving(process.addr, 30)
        with grpc.insecure_channel(process.addr) as channel:
            yield Services(tiny_model_dir, run_dir, worker, process, channel, env)
    finally:
        process.stop(signal.SIGKILL)


def readiness(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="nanoserve.v1.Generation")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status


def start_readers(
    services: Services, num_streams: int, max_tokens: int
) -> tuple[list[threading.Thread], list[tuple[grpc.StatusCode, int, float]]]:
    """Streams that each record (final status, tokens received, when it ended)."""
    results: list[tuple[grpc.StatusCode, int, float]] = []
    sampling = greedy(max_tokens, ignore_eos=True)

    def read(i: int, started: threading.Event) -> None:
        request = pb.GenerateRequest(text=f"{PROMPT} {i}", sampling=sampling, stream=True)
        num_tokens, code = 0, grpc.StatusCode.OK
        try:
            for response in services.stub.Generate(request, timeout=60):
                num_tokens += len(response.chunk.token_ids)
                started.set()
        except grpc.RpcError as e:
            code = e.code()
        started.set()
        results.append((code, num_tokens, time.monotonic()))

    threads = []
    for i in range(num_streams):
        started = threading.Event()
        threads.append(threading.Thread(target=read, args=(i, started)))
        threads[-1].start()
        assert started.wait(10), "a stream produced no token"
    return threads, results


def test_a_hung_worker_is_lost_after_the_step_timeout_and_service_resumes(
    tiny_model_dir: Path, worker: launcher.ServiceProcess, worker_env: dict, tmp_path: Path
) -> None:
    args = ("--step-timeout", str(STEP_TIMEOUT_S))
    with scheduler(tiny_model_dir, worker, worker_env, tmp_path, *args) as services:
        expected = generate(services.stub, text=PROMPT, sampling=greedy(8))[-1].complete
        threads, results = start_readers(services, 3, 400)
        worker.proc.send_signal(signal.SIGSTOP)
        hung_at = time.monotonic()
        try:
            for thread in threads:
                thread.join(STEP_TIMEOUT_S + 10)
            assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 3
            assert max(t for _, _, t in results) - hung_at < STEP_TIMEOUT_S + 3
            wait_for(lambda: readiness(services.channel) == NOT_SERVING, 5, "NOT_SERVING")
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        launcher.wait_until_serving(services.addr, 30)
        again = generate(services.stub, text=PROMPT, sampling=greedy(8))[-1].complete
        assert again.output_ids == expected.output_ids and again.text == expected.text
        assert_kv_cache_clean(services)


def test_a_restarted_scheduler_starts_a_fresh_session_on_live_workers(
    tiny_model_dir: Path, worker: launcher.ServiceProcess, worker_env: dict, tmp_path: Path
) -> None:
    with scheduler(tiny_model_dir, worker, worker_env, tmp_path / "a") as first:
        expected = generate(first.stub, text=PROMPT, sampling=greedy(8))[-1].complete
        threads, results = start_readers(first, 2, 400)
        first.scheduler.proc.send_signal(signal.SIGKILL)  # mid-run: the worker holds its state
        for thread in threads:
            thread.join(10)
        assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE] * 2
    with scheduler(tiny_model_dir, worker, worker_env, tmp_path / "b") as second:
        again = generate(second.stub, text=PROMPT, sampling=greedy(8))[-1].complete
        assert again.output_ids == expected.output_ids and again.text == expected.text
        status = second.status()
        assert status.total_blocks == NUM_KV_BLOCKS
        assert_kv_cache_clean(second)


def test_sigterm_drains_in_flight_requests_then_exits_zero(
    tiny_model_dir: Path, worker: launcher.ServiceProcess, worker_env: dict, tmp_path: Path
) -> None:
    with scheduler(tiny_model_dir, worker, worker_env, tmp_path) as services:
        threads, results = start_readers(services, 2, 300)
        services.scheduler.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: readiness(services.channel) == NOT_SERVING, 1, "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as error:
            generate(services.stub, text=PROMPT, sampling=greedy(4))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in error.value.details()
        for thread in threads:
            thread.join(30)
        assert [(code, n) for code, n, _ in results] == [(grpc.StatusCode.OK, 300)] * 2
        assert services.scheduler.proc.wait(10) == 0


def test_past_the_drain_timeout_what_is_left_is_cancelled_and_the_exit_is_zero(
    tiny_model_dir: Path, worker: launcher.ServiceProcess, worker_env: dict, tmp_path: Path
) -> None:
    args = ("--drain-timeout", "1")
    with scheduler(tiny_model_dir, worker, worker_env, tmp_path, *args) as services:
        threads, results = start_readers(services, 1, 1000)
        services.scheduler.proc.send_signal(signal.SIGTERM)
        assert services.scheduler.proc.wait(10) == 0
        for thread in threads:
            thread.join(5)
        assert [code for code, _, _ in results] != [grpc.StatusCode.OK]
    assert_worker_still_serves(tiny_model_dir, worker, worker_env, tmp_path / "after")


def assert_worker_still_serves(
    tiny_model_dir: Path, worker: launcher.ServiceProcess, env: dict, run_dir: Path
) -> None:
    with scheduler(tiny_model_dir, worker, env, run_dir) as services:
        done = generate(services.stub, text=PROMPT, sampling=greedy(4, ignore_eos=True))[-1]
        assert done.complete.usage.completion_tokens == 4
        assert_kv_cache_clean(services)
