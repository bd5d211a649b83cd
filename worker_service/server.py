"""gRPC server setup for a worker: message limits, keepalive, health and reflection.

A worker serves one scheduler, one step at a time, so a small thread pool suffices. Step plans that
admit many long prompts can be tens of MB, hence the generous message limits. Keepalive lets the
scheduler ping an idle link (and a dead scheduler's connection be dropped).

Anyone who reaches a worker can drive its GPU, so with a secret every ``Worker`` call must carry
``authorization: Bearer <secret>`` (UNAUTHENTICATED otherwise); health stays open for probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.auth import presents, refusal_like
from protos.nanoserve.worker.v1 import worker_pb2, worker_pb2_grpc
from protos.step_trace import StepTrace
from worker_service.servicer import StepExecutor, WorkerServicer

MAX_MESSAGE_BYTES = 1 << 30
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
log = logging.getLogger(__name__)
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class SecretInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for ``Worker`` calls that do not carry the shared secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        if presents(details.invocation_metadata, self._secret):
            return handler
        log.warning("refused %s: missing or wrong worker secret", details.method)
        return refusal_like(handler, "missing or wrong worker secret", aio=False)


def start_server(
    worker: StepExecutor,
    host: str,
    port: int,
    secret: str | None = None,
    trace: StepTrace | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``worker`` on host:port (0 picks a free port); return the server and its port.
    ``trace``: the worker's step trace, where the servicer notes its wire phases."""
    interceptors = [SecretInterceptor(secret)] if secret else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=SERVER_OPTIONS,
        interceptors=interceptors,
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(worker, trace), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound_port
