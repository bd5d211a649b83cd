"""``python -m nanoserve serve --gateway`` (``make serve GATEWAY=1``): replicas and SMG, one command.

A real subprocess with the tiny model on CPU: it prints the OpenAI API's address once SMG's
/readiness is 200; a chat completion through it succeeds and both replicas' schedulers (their
logs in the run directory it names) served; SIGTERM stops every child and exits 0.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from nanoserve import launcher
from tests.gateway_fixtures import smg_binary

READY = re.compile(r"the OpenAI API on (http://\S+/v1) .*\(logs: (\S+)\)", re.S)


def read_until_ready(proc: subprocess.Popen[str], timeout_s: float) -> tuple[str, Path]:
    deadline, seen = time.monotonic() + timeout_s, ""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}:\n{seen}")
        seen += line
        if found := READY.search(seen):
            return found.group(1), Path(found.group(2))
    raise AssertionError(f"not ready after {timeout_s} s:\n{seen}")


def test_serve_gateway_answers_a_chat_through_two_replicas_and_stops_cleanly(
    tiny_model_dir: Path,
) -> None:
    smg_binary()  # skips without smg
    port = launcher.free_port()
    cmd = [sys.executable, "-m", "nanoserve", "serve", "--gateway", "--replicas", "2",
           "--gateway-port", str(port), "--model", str(tiny_model_dir), "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base_url, run_dir = read_until_ready(proc, 300)
        assert base_url == f"http://localhost:{port}/v1"
        client = OpenAI(base_url=base_url, api_key="x", timeout=60)
        model = client.models.list().data[0].id
        for _ in range(4):
            chat = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert chat.usage is not None and chat.usage.completion_tokens >= 1
        assert sorted(p.name for p in run_dir.glob("replica*-scheduler.log")) == [
            "replica0-scheduler.log",
            "replica1-scheduler.log",
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
