"""Security: TLS on the public port, bearer-token authentication, the worker's shared secret,
and no secret in any log.

One worker and one scheduler for the module: TLS (a self-signed certificate made by openssl for
localhost) and a bearer token. The worker shares a secret with the scheduler, as under
``nanoserve serve``. Other schedulers are started against the same worker where a test needs
different flags; the last test reads every log the module wrote.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanoserve import launcher
from protos.nanoserve.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.service_fixtures import (
    AUTH_TOKEN_ENV,
    ROOT,
    Services,
    assert_kv_cache_clean,
    generate,
    generation_pb2_grpc,
    greedy,
    pb,
    running_services,
    start_scheduler,
)

NUM_KV_BLOCKS = 32
GRPCURL = Path(sys.executable).parent / "grpcurl"
TOKEN = secrets.token_urlsafe(24)
WRONG_TOKEN = "wrong-" + secrets.token_hex(8)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def tls_files(run_dir: Path) -> tuple[Path, Path]:
    cert, key = run_dir / "cert.pem", run_dir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, run_dir: Path, tls_files: tuple[Path, Path]):
    cert, key = tls_files
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    env = {AUTH_TOKEN_ENV: TOKEN}
    with running_services(tiny_model_dir, run_dir, NUM_KV_BLOCKS, args, env) as services:
        addr = f"localhost:{services.scheduler.port}"
        wait_until_serving_tls(addr, cert)
        with secure_channel(addr, cert, TOKEN) as channel:
            services.channel = channel
            yield services
            assert_kv_cache_clean(services)


def secure_channel(addr: str, cert: Path, token: str | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    if token is not None:
        call = grpc.access_token_call_credentials(token)  # authorization: Bearer <token>
        credentials = grpc.composite_channel_credentials(credentials, call)
    return grpc.secure_channel(addr, credentials)


def wait_until_serving_tls(addr: str, cert: Path) -> None:
    with secure_channel(addr, cert, None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="nanoserve.v1.Generation")
        for _ in range(300):
            try:
                if stub.Check(request, timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{addr} never became ready")


def tls_addr(services: Services) -> str:
    return f"localhost:{services.scheduler.port}"


def test_tls_with_the_ca_and_the_token_generates(services: Services) -> None:
    done = generate(services.stub, text="Hello", sampling=greedy(4, ignore_eos=True))[-1]
    assert done.complete.usage.completion_tokens == 4


def test_plaintext_is_refused_on_the_tls_port(services: Services) -> None:
    with grpc.insecure_channel(services.addr) as channel:
        with pytest.raises(grpc.RpcError) as error:
            generation_pb2_grpc.GenerationStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=5
            )
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, WRONG_TOKEN], ids=["no_token", "wrong_token"])
def test_calls_without_the_right_token_are_unauthenticated(
    services: Services, tls_files: tuple[Path, Path], token: str | None
) -> None:
    with secure_channel(tls_addr(services), tls_files[0], token) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        calls = [
            lambda: generate(stub, text="Hello", sampling=greedy(4)),
            lambda: stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5),
            lambda: stub.Abort(pb.AbortRequest(request_ids=["x"]), timeout=5),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in error.value.details()


def test_health_stays_open_without_the_token_by_default(
    services: Services, tls_files: tuple[Path, Path]
) -> None:
    with secure_channel(tls_addr(services), tls_files[0], None) as channel:
        request = health_pb2.HealthCheckRequest(service="nanoserve.v1.Generation")
        assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status == SERVING


def test_grpcurl_works_with_cacert_and_the_token(
    services: Services, tls_files: tuple[Path, Path]
) -> None:
    base = [str(GRPCURL), "-cacert", str(tls_files[0])]
    auth = ["-H", "authorization: Bearer ${NANOSERVE_TOKEN}", "-expand-headers"]
    env = {**os.environ, "NANOSERVE_TOKEN": TOKEN}
    listed = subprocess.run(
        [*base, tls_addr(services), "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and "nanoserve.v1.Generation" in listed.stdout, listed.stderr
    request = '{"text": "Hello", "sampling": {"temperature": 0, "max_tokens": 4}}'
    method = "nanoserve.v1.Generation/Generate"
    done = subprocess.run(
        [*base, *auth, "-d", request, tls_addr(services), method],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0 and '"complete"' in done.stdout, done.stderr
    refused = subprocess.run(
        [*base, "-d", request, tls_addr(services), method], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_auth_health_requires_the_token_for_health_too(
    tiny_model_dir: Path, services: Services, run_dir: Path
) -> None:
    env = {**services.env, AUTH_TOKEN_ENV: TOKEN}
    scheduler = start_scheduler(
        tiny_model_dir, [services.worker.addr], run_dir, ["--auth-health"], env, "closed"
    )
    try:
        request = health_pb2.HealthCheckRequest(service="")
        with grpc.insecure_channel(scheduler.addr) as channel:
            with pytest.raises(grpc.RpcError) as error:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = [("authorization", f"Bearer {TOKEN}")]
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5, metadata=metadata)
            assert reply.status == SERVING
    finally:
        scheduler.stop()


def test_the_worker_refuses_calls_without_the_shared_secret(
    tiny_model_dir: Path, services: Services, run_dir: Path
) -> None:
    assert services.worker.host == "127.0.0.1"  # loopback by default
    with grpc.insecure_channel(services.worker.addr) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for metadata in ([], [("authorization", f"Bearer {WRONG_TOKEN}")]):
            with pytest.raises(grpc.RpcError) as error:
                stub.Describe(worker_pb2.DescribeRequest(), timeout=5, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        request = health_pb2.HealthCheckRequest(service="")
        assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status == SERVING
    wrong = {launcher.WORKER_SECRET_ENV: WRONG_TOKEN}
    impostor = start_scheduler(tiny_model_dir, [services.worker.addr], run_dir, (), wrong, "bad")
    try:
        with pytest.raises(TimeoutError):
            launcher.wait_until_serving(impostor.addr, 2)
    finally:
        impostor.stop()
    assert impostor.log_path is not None
    assert "UNAUTHENTICATED" in impostor.log_path.read_text()


def test_a_worker_without_a_secret_refuses_to_bind_beyond_loopback(tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != launcher.WORKER_SECRET_ENV}
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--host", "0.0.0.0"]
    done = subprocess.run(
        [sys.executable, "-m", "worker_service", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert launcher.WORKER_SECRET_ENV in done.stderr


def test_no_secret_appears_in_any_log(services: Services, run_dir: Path) -> None:
    secret = services.env[launcher.WORKER_SECRET_ENV]
    logs = sorted(run_dir.glob("*.log"))
    assert {p.name for p in logs} >= {"worker.log", "scheduler.log", "closed.log", "bad.log"}
    for log in logs:
        text = log.read_text(errors="replace")
        for value in (TOKEN, WRONG_TOKEN, secret):
            assert value not in text, f"a secret leaked into {log.name}"
    assert "refused" in (run_dir / "scheduler.log").read_text()  # refusals are logged, values not
