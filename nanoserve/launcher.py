"""Start worker and scheduler processes, wait until they are ready, stop them together.

Used by ``python -m nanoserve serve`` and by the tests: one place knows how to run the services as
subprocesses on ports the OS picks (``--port 0`` plus a port file) and how to tell they are ready.
Not a supervisor: a process that dies is reported, not restarted. Secrets travel to the children
in environment variables (``secret_env``), never on their command lines, which ``ps`` shows.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READINESS_SERVICE = "nanoserve.v1.Generation"
WORKER_SECRET_ENV = "NANOSERVE_WORKER_SECRET"  # read by both worker_service and scheduler_service


def secret_env() -> dict[str, str]:
    """A fresh worker secret for one deployment, as the environment both services read."""
    return {WORKER_SECRET_ENV: secrets.token_urlsafe(32)}


@dataclass
class ServiceProcess:
    """One service subprocess; ``port`` is known once it has written its port file (or, without
    one, from the start: the caller chose it)."""

    name: str
    proc: subprocess.Popen
    port_file: Path | None
    log_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_for_port(self, timeout_s: float) -> int:
        if self.port_file is None:
            return self.port
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}{self._tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start in {timeout_s:.0f} s{self._tail()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self.port

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-20:]
        return "\n  " + "\n  ".join(lines)


def spawn(
    name: str,
    module: str,
    args: Sequence[str],
    run_dir: Path,
    log_to_file: bool = True,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """``python -m module args --port-file ...`` with output to ``run_dir/name.log`` (or inherited).

    ``env`` is added to this process's environment for the child.
    """
    port_file = run_dir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, *args, "--port-file", str(port_file)]
    return spawn_command(name, cmd, run_dir, port_file, log_to_file=log_to_file, env=env)


def spawn_command(
    name: str,
    cmd: Sequence[str],
    run_dir: Path,
    port_file: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    log_to_file: bool = True,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """``cmd`` with output to ``run_dir/name.log`` (or inherited); ``env`` as for ``spawn``.

    ``port_file``: where the child writes its port; None where the caller chose ``port``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log" if log_to_file else None
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed by stop())
    child_env = {**os.environ, **env} if env else None
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT if log else None, env=child_env
    )
    return ServiceProcess(name, proc, port_file, log_path, host, port, _log=log)


def worker_args(
    model_dir: str, port: int, device: str, rank: int = 0, world_size: int = 1,
    dist_init_addr: str | None = None, extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    args = ["--model", model_dir, "--port", str(port), "--device", device]
    if world_size > 1:
        args += ["--rank", str(rank), "--world-size", str(world_size)]
        args += ["--dist-init-addr", str(dist_init_addr)]
    return args + list(extra)


def wait_until_serving(addr: str, timeout_s: float, service: str = READINESS_SERVICE) -> None:
    """Poll the health service until ``service`` is SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} is not serving {service!r} after {timeout_s:.0f} s")
            time.sleep(0.1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for torch.distributed's store, which cannot report its own)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="nanoserve-"))


def stop_all(services: Sequence[ServiceProcess]) -> None:
    """SIGTERM everything at once (schedulers drain, workers stop), then wait for each."""
    for service in services:
        if service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
    for service in services:
        service.stop()


def first_exited(services: Sequence[ServiceProcess]) -> ServiceProcess | None:
    return next((s for s in services if s.proc.poll() is not None), None)
