"""``python -m scheduler_service --model DIR --workers HOST:PORT[,...] [--port Q]``: the scheduler.

Serves ``nanoserve.v1.Generation`` with health (``""`` liveness; ``nanoserve.v1.Generation``
readiness: SERVING once the workers answer, NOT_SERVING while any is lost and while draining) and
reflection, on grpc.aio; the engine runs in its own thread (engine_loop.py). SIGTERM or Ctrl-C
drains: new requests are refused, in-flight ones get ``--drain-timeout`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nanoserve.v1 import generation_pb2, generation_pb2_grpc
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.servicer import GenerationServicer
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.worker_client import GrpcWorkerClient

log = logging.getLogger("scheduler_service")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
MAX_MESSAGE_BYTES = 64 << 20  # a long prompt sent as token ids
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Long non-streaming calls send nothing for a while: pings keep their connection known alive.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def serve(config: SchedulerServiceConfig) -> None:
    loop = asyncio.get_running_loop()
    tokenizer = Tokenizer.from_dir(config.model_dir)
    worker = GrpcWorkerClient(config.worker_addrs, config.step_timeout_s, config.rpc_timeout_s)
    health_servicer = health.aio.HealthServicer()

    def on_ready_change(ready: bool) -> None:
        status = SERVING if ready else NOT_SERVING
        loop.create_task(health_servicer.set(SERVICE_NAME, status))

    engine_loop = EngineLoop(config, worker, tokenizer, loop, on_ready_change)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(engine_loop, tokenizer), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await health_servicer.set("", SERVING)
    await health_servicer.set(SERVICE_NAME, NOT_SERVING)
    await server.start()
    engine_loop.start()
    log.info("scheduler listening on %s:%d, workers %s", config.host, port, config.worker_addrs)
    print(f"scheduler_service listening on {config.host}:{port}", flush=True)
    if config.port_file:
        _write_port_file(config.port_file, port)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0f s)", config.drain_timeout_s)
    engine_loop.drain()
    await server.stop(config.drain_timeout_s)
    await asyncio.to_thread(engine_loop.stop)
    worker.close()


def _write_port_file(path: str, port: int) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    config = SchedulerServiceConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
