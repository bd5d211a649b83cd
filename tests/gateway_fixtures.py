"""The SMG gateway (``smg launch``, PyPI ``smg``) as a test subprocess in front of real replicas.

``running_gateway`` starts it on an OS-chosen loopback port with the given policy and worker
addresses, waits until ``/readiness`` answers 200 (its ``/health`` answers before any worker is
registered), yields its OpenAI API's base URL and its Prometheus metrics (``Gateway``) and stops
it afterwards; its log goes to the run directory and is shown when it fails to start.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoserve import gateway, launcher


def smg_binary() -> str:
    """The gateway's binary (nanoserve.gateway's lookup); the test is skipped without one."""
    try:
        return gateway.smg_binary()
    except FileNotFoundError:
        pytest.skip("the smg gateway binary is not installed (pip install smg)")


class Gateway(NamedTuple):
    base_url: str  # the OpenAI API: http://127.0.0.1:PORT/v1
    metrics_url: str

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus series' samples whose labels include ``labels`` (0 if none)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@contextmanager
def running_gateway(
    worker_addrs: Sequence[str],
    model_dir: Path,
    run_dir: Path,
    policy: str,
    extra: Sequence[str] = (),
) -> Iterator[Gateway]:
    smg_binary()  # skips the test where smg is not installed
    port, metrics_port = launcher.free_port(), launcher.free_port()
    smg = gateway.spawn_gateway(
        worker_addrs, str(model_dir), "127.0.0.1", port, policy, run_dir, metrics_port, extra
    )
    try:
        gateway.wait_until_ready(smg, 60)
        yield Gateway(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        smg.stop()
