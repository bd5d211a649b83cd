"""The Node.js client (clients/node) against a live server: same greedy output as the Python client.

A real worker and scheduler on loopback (tests/service_fixtures.py); the Node client loads
protos/ at runtime and streams Generate. Skipped when node or npm is missing, or when its
dependencies cannot be installed (``npm ci`` needs the npm registry, once).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_fixtures import Services, generate, greedy, running_services

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "node"
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def node_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not installed: the Node.js client cannot run here")
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT_DIR, capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"npm ci failed in clients/node (no registry?): {done.stderr[-500:]}")
    return CLIENT_DIR / "generate.js"


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with running_services(tiny_model_dir, tmp_path_factory.mktemp("node"), 128) as services:
        yield services


def node_generate(client: Path, addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(client), "--addr", addr, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_node_client_greedy_output_equals_the_python_clients(
    node_client: Path, services: Services, prompt: str
) -> None:
    python = generate(services.stub, text=prompt, sampling=greedy(12), stream=True)[-1].complete

    done = node_generate(
        node_client, services.addr, "--json", "--temperature", "0", "--max-tokens", "12", prompt
    )

    assert done.returncode == 0, done.stderr
    node = json.loads(done.stdout)
    assert node["output_ids"] == list(python.output_ids)
    assert node["text"] == python.text
    assert node["finish_reason"] == "LENGTH"
    assert node["usage"]["completion_tokens"] == 12
    assert node["num_chunks"] >= 1


def test_node_client_streams_text_to_stdout(node_client: Path, services: Services) -> None:
    python = generate(services.stub, text=PROMPTS[0], sampling=greedy(8))[-1].complete

    done = node_generate(
        node_client, services.addr, "--temperature", "0", "--max-tokens", "8", PROMPTS[0]
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == python.text + "\n"


def test_node_client_reports_a_bad_request_as_its_grpc_status(
    node_client: Path, services: Services
) -> None:
    done = node_generate(node_client, services.addr, "--max-tokens", "0", "hi")

    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr
    assert "max_tokens" in done.stderr
