"""Helpers for the gRPC tests: real worker and scheduler processes on OS-chosen loopback ports.

Nothing is mocked: ``running_services`` starts ``python -m worker_service`` and
``python -m scheduler_service`` as subprocesses (through nanoserve.launcher, as ``nanoserve serve``
does), waits for readiness, and stops both afterwards. Their logs go to the test's run directory
and are printed when a service fails to start. The two share a fresh worker secret, as under
``nanoserve serve``.

The KV-cache invariant: once a ``running_services`` block's traffic is done, every KV block is free
(``free_blocks == total_blocks``, which by the BlockManager's invariants means every reference count
is zero) and the scheduler never logged a violation of its idle-time ``check_invariants``.
``assert_kv_cache_clean`` checks it; ``running_services`` calls it on a clean exit, and modules that
share one server call it after each test (see ``kv_cache_clean_after_each_test``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from nanoserve import launcher

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16


def ensure_stubs() -> None:
    """Generate the gRPC stubs if a fresh checkout has none yet (``make protos`` does the same)."""
    if not (ROOT / "protos" / "nanoserve" / "v1" / "generation_pb2.py").exists():
        env = dict(os.environ, PYTHON=sys.executable)
        subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh")], check=True, env=env)


ensure_stubs()

from protos.nanoserve.v1 import generation_pb2 as pb  # noqa: E402
from protos.nanoserve.v1 import generation_pb2_grpc  # noqa: E402

T = TypeVar("T")


@dataclass
class Services:
    model_dir: Path
    run_dir: Path
    worker: launcher.ServiceProcess
    scheduler: launcher.ServiceProcess
    channel: grpc.Channel
    env: dict[str, str]

    @property
    def addr(self) -> str:
        return self.scheduler.addr

    @property
    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self.channel)

    def status(self) -> pb.GetServerStatusResponse:
        return self.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5)


def start_worker(
    model_dir: Path,
    run_dir: Path,
    num_kv_blocks: int,
    port: int = 0,
    name: str = "worker",
    env: dict[str, str] | None = None,
) -> launcher.ServiceProcess:
    extra = ["--num-kv-blocks", str(num_kv_blocks), "--block-size", str(BLOCK_SIZE)]
    args = launcher.worker_args(str(model_dir), port, "cpu", extra=extra)
    worker = launcher.spawn(name, "worker_service", args, run_dir, env=env)
    worker.wait_for_port(120)
    return worker


def start_scheduler(
    model_dir: Path,
    worker_addrs: Sequence[str],
    run_dir: Path,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    name: str = "scheduler",
) -> launcher.ServiceProcess:
    args = ["--model", str(model_dir), "--workers", ",".join(worker_addrs), "--port", "0"]
    scheduler = launcher.spawn(name, "scheduler_service", [*args, *extra], run_dir, env=env)
    scheduler.wait_for_port(60)
    return scheduler


@contextmanager
def running_services(
    model_dir: Path,
    run_dir: Path,
    num_kv_blocks: int,
    scheduler_args: Sequence[str] = (),
    scheduler_env: dict[str, str] | None = None,
    check_kv_cache: bool = True,
) -> Iterator[Services]:
    """A CPU worker with ``num_kv_blocks`` blocks of BLOCK_SIZE tokens and a scheduler, ready.

    On a clean exit the KV-cache invariant is asserted (unless ``check_kv_cache`` is False, for
    tests that take the scheduler down themselves).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    env = launcher.secret_env()
    started: list[launcher.ServiceProcess] = []
    try:
        started.append(start_worker(model_dir, run_dir, num_kv_blocks, env=env))
        scheduler_env = {**env, **(scheduler_env or {})}
        started.append(
            start_scheduler(model_dir, [started[0].addr], run_dir, scheduler_args, scheduler_env)
        )
        if "--tls-cert" not in scheduler_args and not scheduler_env.get(AUTH_TOKEN_ENV):
            launcher.wait_until_serving(started[1].addr, 60)
            with grpc.insecure_channel(started[1].addr) as channel:
                services = Services(model_dir, run_dir, started[0], started[1], channel, env)
                yield services
                if check_kv_cache and services.status().ready:  # else no worker: nothing to ask
                    assert_kv_cache_clean(services)
        else:  # the test opens its own (secure or authenticated) channel
            yield Services(model_dir, run_dir, started[0], started[1], None, env)  # type: ignore[arg-type]
    except Exception:
        for service in started:
            print(f"--- {service.name} log ---\n{service._tail()}", file=sys.stderr)
        raise
    finally:
        launcher.stop_all(started)


AUTH_TOKEN_ENV = "NANOSERVE_AUTH_TOKEN"
INVARIANT_VIOLATION = "KV cache invariant violated"


def assert_kv_cache_clean(services: Services, timeout_s: float = 10.0) -> None:
    """No request left, every KV block free (so every ref count 0), no invariant violation logged."""

    def clean() -> bool:
        s = services.status()
        idle = s.num_running_requests == 0 and s.num_waiting_requests == 0
        return idle and s.free_blocks == s.total_blocks > 0

    wait_for(clean, timeout_s, "every KV block to be free")
    assert services.scheduler.log_path is not None
    assert INVARIANT_VIOLATION not in services.scheduler.log_path.read_text(errors="replace")


@pytest.fixture
def kv_cache_clean_after_each_test(services: Services) -> Iterator[None]:
    """Use (autouse) in a module whose tests share a module-scoped ``services`` fixture."""
    yield
    assert_kv_cache_clean(services)


def generate(
    stub: generation_pb2_grpc.GenerationStub, timeout: float = 60, **request: object
) -> list[pb.GenerateResponse]:
    """All responses of one Generate call."""
    return list(stub.Generate(pb.GenerateRequest(**request), timeout=timeout))


def greedy(max_tokens: int, **sampling: object) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling)


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
