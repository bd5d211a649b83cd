"""The real ``docker compose --profile gateway`` deployment: SMG in front of two CPU replicas.

Builds the images as test_compose.py does (its fixtures: docker, the base image, the local wheel
directory, the scheduler and worker images) plus docker/Dockerfile.gateway, starts the profile
under its own project name with the gateway on a free port, waits until the gateway's container
health check (SMG's /readiness) says healthy, and sends a chat completion and a completion to
the OpenAI API through that port with the ``openai`` client; ``compose down -v`` always.

Runs only with NANOSERVE_TEST_COMPOSE=1 (``make test-compose``). The config check at the bottom
runs in every ``make test``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from openai import OpenAI

from tests.compose import test_compose as cpu_profile
from tests.compose.test_compose import (
    IMAGE_PREFIX,
    ROOT,
    Deployment,
    build_image,
    compose_command,
    compose_up,
    free_port,
    run,
)

# the cpu profile's fixtures, shared: docker, the base image, the wheel directory, its images
docker_ready, base_image = cpu_profile.docker_ready, cpu_profile.base_image
wheel_server, images = cpu_profile.wheel_server, cpu_profile.images

GATEWAY, REPLICAS = "gateway", ("replica-0", "replica-1")
HEALTHY_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def gateway_images(images: dict[str, str], base_image: str) -> dict[str, str]:
    build_image(
        "docker/Dockerfile.gateway", f"{IMAGE_PREFIX}/gateway:latest", {"BASE_IMAGE": base_image}
    )
    return images


@pytest.fixture(scope="module")
def gateway(docker_ready: list[str], gateway_images: dict[str, str]) -> Iterator[Deployment]:
    port = free_port()
    env = {**gateway_images, "NANOSERVE_GATEWAY_PORT": str(port)}
    addr = f"127.0.0.1:{port}"
    with compose_up(docker_ready, "gateway", env, addr, GATEWAY, HEALTHY_TIMEOUT_S) as deployment:
        yield deployment


def test_gateway_profile_starts_both_replicas_and_the_gateway_healthy(gateway: Deployment) -> None:
    for service in (*REPLICAS, GATEWAY):
        assert gateway.health(service) == "healthy", service


def test_a_chat_completion_through_port_8000_succeeds(gateway: Deployment) -> None:
    client = OpenAI(base_url=f"http://{gateway.addr}/v1", api_key="x", timeout=60)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story"}],
        temperature=0,
        max_tokens=8,
    )
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 8
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=4)
    assert completion.usage is not None and completion.usage.completion_tokens >= 1


# ---- runs in every `make test`: the file itself ------------------------------------------------


def test_gateway_profile_validates_with_health_checks_and_ordered_start() -> None:
    compose = compose_command()
    if compose is None:
        pytest.skip("no compose command (apt-get install docker-compose)")
    done = run([*compose, "--profile", "gateway", "config"], cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr

    services = yaml.safe_load(done.stdout)["services"]
    assert {GATEWAY, *REPLICAS, "replica-0-worker", "replica-1-worker"} <= set(services)
    for name, service in services.items():
        assert "healthcheck.py" in " ".join(service["healthcheck"]["test"]), name
    gateway = services[GATEWAY]
    assert {p["target"] for p in gateway["ports"]} == {8000}
    assert all(gateway["depends_on"][r]["condition"] == "service_healthy" for r in REPLICAS)
    assert [f"grpc://{r}:50051" for r in REPLICAS] == gateway["command"][1:3]
    assert not any(services[r].get("ports") for r in REPLICAS)  # reached through the gateway
