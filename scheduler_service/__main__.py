"""``python -m scheduler_service --model DIR --workers HOST:PORT[,...] [--port Q]``: the scheduler.

Serves ``nanoserve.v1.Generation`` and ``vllm.grpc.engine.VllmEngine`` (for the SMG gateway:
vllm_engine.py) with health (``""`` liveness; either service's name readiness: SERVING once the
workers answer and the warm-up ran, NOT_SERVING while any is lost and while draining) and
reflection, on grpc.aio. This process is the front end; the engine loop runs in a process of its
own (engine_process.py). SIGTERM or Ctrl-C drains: readiness turns
NOT_SERVING and new requests are refused with UNAVAILABLE while health keeps answering; in-flight
ones get ``--drain-timeout`` seconds to finish; then the process exits 0.
With ``--tls-cert``/``--tls-key`` the port speaks TLS only; with ``$NANOSERVE_AUTH_TOKEN`` every
call (health and reflection too, with ``--auth-health``) needs ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto.generated import vllm_engine_pb2

from protos.auth import OPEN_SERVICE_PREFIXES, BearerTokenInterceptor
from protos.nanoserve.v1 import generation_pb2
from protos.step_trace import FRONT_SUFFIX, StepTrace, open_trace
from scheduler_service.config import SchedulerServiceConfig, configure_logging
from scheduler_service.constraint_checks import ConstraintChecker
from scheduler_service.engine_client import EngineClient
from scheduler_service.engine_process import EngineProcess
from scheduler_service.metrics import Metrics
from scheduler_service.servicer import GenerationServicer, add_to_server
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.vllm_engine import SERVICE as VLLM_SERVICE
from scheduler_service.vllm_engine import SERVICE_NAME as VLLM_SERVICE_NAME
from scheduler_service.vllm_engine import VllmEngineServicer

log = logging.getLogger("scheduler_service")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
READINESS_SERVICES = (SERVICE_NAME, VLLM_SERVICE_NAME)  # what health reports as ready
MAX_SEND_MESSAGE_BYTES = 64 << 20  # a long Complete with logprobs
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
    # Long non-streaming calls send nothing for a while: pings keep their connection known alive.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def serve(config: SchedulerServiceConfig, trace: StepTrace | None = None) -> int:
    """Serve until SIGTERM/SIGINT (then drain: 0) or until the engine process dies (1).
    ``trace``: the front end's step trace (benchmarks: the outputs' way to the request streams)."""
    loop = asyncio.get_running_loop()
    tokenizer = Tokenizer.from_dir(config.model_dir)
    health_servicer = health.aio.HealthServicer()

    def on_ready_change(ready: bool) -> None:
        status = SERVING if ready else NOT_SERVING
        for name in READINESS_SERVICES:
            loop.create_task(health_servicer.set(name, status))

    metrics = Metrics()
    engine = EngineProcess(config, trace)
    client = EngineClient(config, engine, on_ready_change, metrics)
    metrics.track_stats(lambda: client.stats)
    if config.metrics_port is not None:
        metrics_port = metrics.start_http_server(config.metrics_port, config.host)
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
    server = _make_server(config)
    constraints = ConstraintChecker(config.worker_addrs[0], config.worker_secret)
    add_to_server(GenerationServicer(client, tokenizer, config, metrics, constraints), server)
    add_to_server(
        VllmEngineServicer(client, tokenizer, config, metrics, constraints),
        server,
        vllm_engine_pb2.DESCRIPTOR,
        VLLM_SERVICE,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*READINESS_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _add_port(server, config)
    await health_servicer.set("", SERVING)
    for name in READINESS_SERVICES:
        await health_servicer.set(name, NOT_SERVING)
    stop = asyncio.Event()
    engine_died = False

    def on_engine_exit() -> None:
        nonlocal engine_died
        engine_died = True
        client.engine_gone()
        stop.set()

    engine.start(client, loop, on_engine_exit)
    # Everything built so far lives as long as the process: keep it out of the garbage
    # collector's full passes, which would otherwise walk it (a pause of the front end).
    gc.freeze()
    await server.start()
    scheme = "TLS" if config.tls else "plaintext"
    auth = "bearer token" if config.auth_token else "no authentication"
    log.info("scheduler listening on %s:%d (%s, %s)", config.host, port, scheme, auth)
    log.info("workers %s", ",".join(config.worker_addrs))
    print(f"scheduler_service listening on {config.host}:{port}", flush=True)
    if config.port_file:
        _write_port_file(config.port_file, port)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if not engine_died:
        await _drain(client, config.drain_timeout_s)
    await server.stop(1.0)  # whatever is left past the drain timeout is cancelled (and aborted)
    await asyncio.to_thread(engine.stop)
    log.info("stopped")
    return 1 if engine_died else 0


async def _drain(client: EngineClient, timeout_s: float) -> None:
    """Refuse new requests (health still answers NOT_SERVING) until in-flight ones are done."""
    log.info("draining: %d streams in flight, up to %.0f s", client.num_streams, timeout_s)
    client.drain()
    deadline = time.monotonic() + timeout_s
    while client.num_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if client.num_streams:
        log.warning("drain timeout: cancelling %d streams", client.num_streams)


def _make_server(config: SchedulerServiceConfig) -> grpc.aio.Server:
    options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", config.max_message_bytes)]
    interceptors = []
    if config.auth_token:
        open_prefixes = () if config.auth_health else OPEN_SERVICE_PREFIXES
        interceptors.append(BearerTokenInterceptor(config.auth_token, open_prefixes))
    return grpc.aio.server(options=options, interceptors=interceptors)


def _add_port(server: grpc.aio.Server, config: SchedulerServiceConfig) -> int:
    address = f"{config.host}:{config.port}"
    if not config.tls:
        return server.add_insecure_port(address)
    assert config.tls_cert is not None and config.tls_key is not None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    return server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))


def _write_port_file(path: str, port: int) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    config = SchedulerServiceConfig.from_args(argv).with_secrets(os.environ)
    configure_logging(config)
    # The engine process writes the step trace; the front end only its outputs' hops.
    with open_trace(config.step_trace and config.step_trace + FRONT_SUFFIX) as trace:
        code = asyncio.run(serve(config, trace))
    sys.exit(code)


if __name__ == "__main__":
    main()
