"""The scheduler service's two processes: the engine loop runs in a child of the front end. If the
engine process dies, every live request fails with UNAVAILABLE at once and the service exits
non-zero (for its supervisor to restart it); on SIGTERM both exit cleanly."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc

from tests.service_fixtures import greedy, pb, running_services

NUM_KV_BLOCKS = 32


def engine_pids(pid: int) -> list[int]:
    """The children of ``pid`` that multiprocessing spawned to run a target (not its helpers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_the_engine_runs_in_a_child_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    with running_services(
        tiny_model_dir, tmp_path, NUM_KV_BLOCKS, check_kv_cache=False
    ) as services:
        (engine_pid,) = engine_pids(services.scheduler.proc.pid)
        services.scheduler.stop()  # SIGTERM: drain, stop the engine, exit 0
        assert services.scheduler.proc.returncode == 0
        assert not os.path.exists(f"/proc/{engine_pid}") or _is_zombie(engine_pid)


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


def test_a_dead_engine_fails_live_requests_and_the_service_exits_non_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with running_services(tiny_model_dir, tmp_path, NUM_KV_BLOCKS, check_kv_cache=False) as s:
        sampling = greedy(400, ignore_eos=True)
        request = pb.GenerateRequest(text="story", sampling=sampling, stream=True)
        stream = s.stub.Generate(request, timeout=60)
        next(stream)  # running
        errors: list[tuple[grpc.StatusCode, str]] = []

        def read() -> None:
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as e:
                errors.append((e.code(), e.details()))

        reader = threading.Thread(target=read)
        reader.start()
        (engine_pid,) = engine_pids(s.scheduler.proc.pid)
        os.kill(engine_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        reader.join(10)
        assert errors == [(grpc.StatusCode.UNAVAILABLE, "the engine process exited")]
        assert s.scheduler.proc.wait(10) == 1
        assert time.monotonic() - killed_at < 10
