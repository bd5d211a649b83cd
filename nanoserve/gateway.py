"""SMG, the OpenAI-API gateway, as a child process of ``nanoserve serve --gateway``.

``spawn_gateway`` starts ``smg launch`` (PyPI ``smg``: the binary beside this interpreter, else on
PATH) in front of the given replicas' schedulers (``grpc://ADDR``, vLLM's engine protocol) with
the model directory for its tokenizer, logging to the run directory; ``wait_until_ready`` polls
its ``/readiness`` (200 once a replica is registered; ``/health`` answers before that).
Not here: starting the replicas (cli.py, launcher.py).
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from nanoserve import launcher


def smg_binary() -> str:
    """The ``smg`` binary's path; FileNotFoundError where it is not installed."""
    beside = Path(sys.executable).parent / "smg"
    found = str(beside) if beside.exists() else shutil.which("smg")
    if found is None:
        raise FileNotFoundError(
            "the smg gateway is not installed: pip install smg (requirements-dev.txt)"
        )
    return found


def spawn_gateway(
    worker_addrs: Sequence[str],
    model_dir: str,
    host: str,
    port: int,
    policy: str,
    run_dir: Path,
    metrics_port: int = 0,
    extra: Sequence[str] = (),
) -> launcher.ServiceProcess:
    """``metrics_port``: SMG's Prometheus port (0: a free one); ``extra``: more ``smg launch``
    flags."""
    args = [
        smg_binary(), "launch", "--host", host, "--port", str(port),
        "--worker-urls", *[f"grpc://{addr}" for addr in worker_addrs],
        "--model-path", model_dir, "--policy", policy,
        "--prometheus-port", str(metrics_port or launcher.free_port()), *extra,
    ]  # fmt: skip
    # smg writes no port file: the port is chosen here
    return launcher.spawn_command("gateway", args, run_dir, host=host, port=port)


def wait_until_ready(gateway: launcher.ServiceProcess, timeout_s: float) -> None:
    host = "127.0.0.1" if gateway.host in ("0.0.0.0", "::") else gateway.host
    url = f"http://{host}:{gateway.port}/readiness"
    deadline = time.monotonic() + timeout_s
    while True:
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"smg exited with {gateway.proc.returncode}{gateway._tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} is not 200 after {timeout_s:.0f} s{gateway._tail()}")
        time.sleep(0.2)
