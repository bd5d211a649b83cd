"""The SMG gateway (``smg launch``, PyPI ``smg``) as a test subprocess in front of real replicas.

``running_gateway`` starts it on an OS-chosen loopback port with the given policy and worker
addresses, waits until ``/readiness`` answers 200 (its ``/health`` answers before any worker is
registered), yields its OpenAI API's base URL and its Prometheus metrics (``Gateway``) and stops
it afterwards; its log goes to the run directory and is shown when it fails to start.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from nanoserve import launcher

SMG = Path(sys.executable).parent / "smg"


def smg_binary() -> str:
    found = str(SMG) if SMG.exists() else shutil.which("smg")
    if found is None:
        pytest.skip("the smg gateway binary is not installed (pip install smg)")
    return found


class Gateway(NamedTuple):
    base_url: str  # the OpenAI API: http://127.0.0.1:PORT/v1
    metrics_url: str

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus series' samples whose labels include ``labels`` (0 if none)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and all(
                f'{k}="{v}"' in series for k, v in labels.items()
            ):
                total += float(value)
        return total


@contextmanager
def running_gateway(
    worker_addrs: Sequence[str],
    model_dir: Path,
    run_dir: Path,
    policy: str,
    extra: Sequence[str] = (),
) -> Iterator[Gateway]:
    port, metrics_port = launcher.free_port(), launcher.free_port()
    log_path = run_dir / f"smg-{policy}.log"
    args = [
        smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *[f"grpc://{addr}" for addr in worker_addrs],
        "--model-path", str(model_dir), "--policy", policy,
        "--prometheus-port", str(metrics_port), *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_readiness(f"http://127.0.0.1:{port}/readiness", proc, log_path)
        yield Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_readiness(
    url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"smg exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"smg not ready after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
