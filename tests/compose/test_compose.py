"""The real ``docker compose --profile cpu`` deployment: build, start, become healthy, generate, stop.

Steps, each of which skips (with the reason) when this machine cannot do it:
1. docker must answer (``docker info``) and a compose command must exist (``docker compose`` v2 or
   ``docker-compose`` v1).
2. The base image: ``$NANOSERVE_TEST_BASE_IMAGE`` if given (e.g. python:3.11-slim-bookworm from a
   registry), else a local Debian built by scripts/build_base_image.sh (debootstrap, cached by tag).
3. The project images, built with ``docker build --network host`` (layer cache kept between runs):
   pip inside the build reaches the index through the base image's CA bundle; a local wheel
   directory (``$NANOSERVE_TEST_WHEELS_DIR``, default /opt/wheels) is served over HTTP as
   find-links, so the CPU torch wheel comes from disk.
4. ``compose --profile cpu up -d --no-build`` under its own project name and a free port; wait until
   the scheduler's container health check (gRPC readiness) says healthy.
5. grpcurl: reflection lists the services, health says SERVING, Generate with JSON, and with a
   regex constraint (structured output needs the worker image's xgrammar and transformers).
6. The Node.js client generates the same greedy tokens as grpcurl did.
7. ``compose down -v``, always.

Runs only with NANOSERVE_TEST_COMPOSE=1 (``make test-compose``): a cold run builds images for a
few minutes. The config check at the bottom runs in every ``make test``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = Path(sys.executable).parent / "grpcurl"
NODE_CLIENT = ROOT / "clients" / "node" / "generate.js"
LOCAL_BASE_IMAGE = "nanoserve/debian-python:bookworm"
IMAGE_PREFIX = "nanoserve-test"
SCHEDULER, WORKER = "scheduler-cpu", "worker-cpu"
HEALTHY_TIMEOUT_S = 300
PROMPT = "Hello world"
WHEELS_PORT = int(os.environ.get("NANOSERVE_TEST_WHEELS_PORT", "18731"))


def run(
    cmd: list[str], timeout: float = 1800, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def compose_command() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    compose: list[str]  # the compose command with project name and profile
    env: dict[str, str]
    addr: str

    def logs(self) -> str:
        return run([*self.compose, "logs", "--no-color", "--tail", "40"], env=self.env).stdout

    def health(self, service: str) -> str:
        ids = run([*self.compose, "ps", "-q", service], env=self.env).stdout.split()
        if not ids:
            return "missing"
        fmt = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
        return run(["docker", "inspect", "-f", fmt, ids[0]]).stdout.strip()


@pytest.fixture(scope="module")
def docker_ready() -> list[str]:
    if os.environ.get("NANOSERVE_TEST_COMPOSE") != "1":
        pytest.skip(
            "builds images for minutes: run with NANOSERVE_TEST_COMPOSE=1 (make test-compose)"
        )
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed (apt-get install docker.io docker-compose)")
    info = run(["docker", "info"], timeout=60)
    if info.returncode != 0:
        pytest.skip(f"docker is not usable: `docker info` says: {info.stderr.strip()[-300:]}")
    compose = compose_command()
    if compose is None:
        pytest.skip("no compose: neither `docker compose` nor `docker-compose` works")
    return compose


@pytest.fixture(scope="module")
def base_image(docker_ready: list[str]) -> str:
    image = os.environ.get("NANOSERVE_TEST_BASE_IMAGE")
    if image:
        return image
    exists = run(["docker", "image", "inspect", LOCAL_BASE_IMAGE]).returncode == 0
    if not exists and shutil.which("debootstrap") is None:
        pytest.skip("no base image: debootstrap is missing and NANOSERVE_TEST_BASE_IMAGE is unset")
    t0 = time.monotonic()
    done = run(["bash", str(ROOT / "scripts" / "build_base_image.sh"), LOCAL_BASE_IMAGE])
    assert done.returncode == 0, f"build_base_image.sh failed:\n{done.stdout}\n{done.stderr}"
    print(f"base image {LOCAL_BASE_IMAGE}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return LOCAL_BASE_IMAGE


@pytest.fixture(scope="module")
def wheel_server() -> Iterator[str | None]:
    """find-links URL of the local wheel directory served on loopback (None: no such directory)."""
    wheels = Path(os.environ.get("NANOSERVE_TEST_WHEELS_DIR", "/opt/wheels"))
    if not wheels.is_dir():
        yield None
        return
    handler = functools.partial(_QuietHandler, directory=str(wheels))
    try:  # a fixed port keeps the build args, hence docker's layer cache, the same across runs
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build_image(dockerfile: str, tag: str, build_args: dict[str, str]) -> None:
    args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
    cmd = ["docker", "build", "--network=host", "-f", dockerfile, "-t", tag, *args, "."]
    t0 = time.monotonic()
    done = run(cmd, cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr}"
    print(f"built {tag}: {time.monotonic() - t0:.0f} s", file=sys.stderr)


@pytest.fixture(scope="module")
def images(base_image: str, wheel_server: str | None) -> dict[str, str]:
    pip_args = {"BASE_IMAGE": base_image}
    if wheel_server:
        pip_args |= {"PIP_FIND_LINKS": wheel_server, "PIP_TRUSTED_HOST": "127.0.0.1"}
    torch_args = {"TORCH_SPEC": f"torch=={_host_torch_version()}", "TORCH_INDEX_URL": ""}
    build_image("docker/Dockerfile.scheduler", f"{IMAGE_PREFIX}/scheduler:latest", pip_args)
    build_image(
        "docker/Dockerfile.worker", f"{IMAGE_PREFIX}/worker-cpu:latest", pip_args | torch_args
    )
    return {"NANOSERVE_IMAGE_PREFIX": IMAGE_PREFIX, "NANOSERVE_TAG": "latest"}


def _host_torch_version() -> str:
    """The torch this venv runs (a CPU wheel the wheel directory holds), without its +local tag."""
    from importlib.metadata import version

    return version("torch").split("+")[0]


@contextmanager
def compose_up(
    docker_ready: list[str],
    profile: str,
    env: dict[str, str],
    addr: str,
    healthy: str,
    timeout_s: float = HEALTHY_TIMEOUT_S,
) -> Iterator[Deployment]:
    """``compose --profile PROFILE up`` under a project of its own, until service ``healthy``'s
    health check passes; ``down -v`` however it ends."""
    project = f"nanoserve-{profile}-test-{os.getpid()}"
    env = {**os.environ, **env}
    compose = [*docker_ready, "-p", project, "--profile", profile]
    deployment = Deployment(compose, env, addr)
    t0 = time.monotonic()
    try:
        up = run([*compose, "up", "-d", "--no-build"], cwd=ROOT, env=env, timeout=600)
        assert up.returncode == 0, f"compose up failed:\n{up.stderr}\n{deployment.logs()}"
        deadline = time.monotonic() + timeout_s
        while deployment.health(healthy) != "healthy":
            assert time.monotonic() < deadline, f"not healthy in time:\n{deployment.logs()}"
            time.sleep(1)
        print(f"{profile} profile up to healthy: {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield deployment
    finally:
        down = run([*compose, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env, timeout=300)
        if down.returncode != 0:
            print(f"compose down failed: {down.stderr}", file=sys.stderr)


@pytest.fixture(scope="module")
def deployment(docker_ready: list[str], images: dict[str, str]) -> Iterator[Deployment]:
    port = free_port()
    env = {**images, "NANOSERVE_PORT": str(port)}
    with compose_up(docker_ready, "cpu", env, f"127.0.0.1:{port}", SCHEDULER) as deployment:
        yield deployment


def grpcurl(addr: str, *args: str, data: dict | None = None) -> str:
    cmd = [str(GRPCURL), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    done = run([*cmd, addr, *args], timeout=60)
    assert done.returncode == 0, f"grpcurl {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def test_cpu_profile_starts_both_services_healthy(deployment: Deployment) -> None:
    assert deployment.health(WORKER) == "healthy"
    assert deployment.health(SCHEDULER) == "healthy"


def test_grpcurl_lists_checks_health_and_generates(deployment: Deployment) -> None:
    assert "nanoserve.v1.Generation" in grpcurl(deployment.addr, "list").split()
    health = grpcurl(
        deployment.addr, "grpc.health.v1.Health/Check", data={"service": "nanoserve.v1.Generation"}
    )
    assert json.loads(health)["status"] == "SERVING"

    request = {"text": PROMPT, "sampling": {"temperature": 0, "max_tokens": 8}, "stream": True}
    out = grpcurl(deployment.addr, "nanoserve.v1.Generation/Generate", data=request)

    complete = _complete_of(out)
    assert len(complete["output_ids"]) == 8
    assert complete["finish_reason"] == "LENGTH"


def test_a_regex_constraint_holds_through_the_images(deployment: Deployment) -> None:
    """Structured output needs the worker image's grammar compiler (xgrammar and transformers)."""
    request = {"text": PROMPT, "sampling": {"temperature": 0, "max_tokens": 16, "regex": "(ab)+"}}
    complete = _complete_of(
        grpcurl(deployment.addr, "nanoserve.v1.Generation/Generate", data=request)
    )
    assert re.fullmatch("(ab)+", complete["text"]), complete


def test_node_client_generates_the_same_greedy_tokens_as_grpcurl(deployment: Deployment) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (NODE_CLIENT.parent / "node_modules").is_dir():
        npm = run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT.parent, timeout=300)
        if npm.returncode != 0:
            pytest.skip(f"npm ci failed in clients/node: {npm.stderr[-300:]}")
    request = {"text": PROMPT, "sampling": {"temperature": 0, "max_tokens": 12}}
    expected = _complete_of(
        grpcurl(deployment.addr, "nanoserve.v1.Generation/Generate", data=request)
    )

    done = run(
        ["node", str(NODE_CLIENT), "--addr", deployment.addr, "--json", "--temperature", "0",
         "--max-tokens", "12", PROMPT], timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    node = json.loads(done.stdout)
    assert node["output_ids"] == expected["output_ids"]
    assert node["text"] == expected["text"]


def _complete_of(grpcurl_stdout: str) -> dict:
    """The Complete message of a Generate call printed by grpcurl (a stream of JSON objects)."""
    decoder, text, pos, last = json.JSONDecoder(), grpcurl_stdout.strip(), 0, None
    while pos < len(text):
        last, end = decoder.raw_decode(text, pos)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert last is not None and "complete" in last, grpcurl_stdout
    return last["complete"]


# ---- runs in every `make test`: the file itself ------------------------------------------------


def test_compose_file_validates_and_every_service_has_a_health_check() -> None:
    compose = compose_command()
    if compose is None:
        pytest.skip("no compose command (apt-get install docker-compose)")
    done = run([*compose, "--profile", "cpu", "--profile", "gpu", "config"], cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr

    services = yaml.safe_load(done.stdout)["services"]
    assert {"scheduler", "worker-0", "scheduler-cpu", "worker-cpu"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        assert "healthcheck.py" in " ".join(service["healthcheck"]["test"]), name
    assert services["scheduler-cpu"]["depends_on"]["worker-cpu"]["condition"] == "service_healthy"
    gpu = services["worker-0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and len(gpu["device_ids"]) == 1
