"""SchedulerServiceConfig: every setting of the scheduler process, built once from flags in main().

The engine's own knobs (batch budgets, max_model_len, prefix caching) are an EngineConfig, derived
as a property; the rest concern the service: addresses, limits, timeouts, TLS and authentication.
Secrets (the bearer token, the worker secret) come from environment variables, never from flags,
so they do not show in ``ps``; ``repr`` hides them, so they never reach a log line. ``main()``
reads the environment and hands it over (``from_args(argv).with_secrets(os.environ)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from protos.envargs import apply_env_defaults
from protos.step_trace import SCHEDULER_SUFFIX
from scheduler_service.engine import EngineConfig

AUTH_TOKEN_ENV = "NANOSERVE_AUTH_TOKEN"  # clients send ``authorization: Bearer <token>``
WORKER_SECRET_ENV = "NANOSERVE_WORKER_SECRET"  # shared with the workers (see worker_service)


@dataclass(frozen=True)
class SchedulerServiceConfig:
    model_dir: str
    worker_addrs: tuple[str, ...]  # HOST:PORT of each worker (any order: they report their rank)
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks one (printed, and written to port_file)
    port_file: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Step plans sent ahead of their answers: 2 keeps the next step queued on the GPU even when
    # a round trip to the workers takes longer than a step (stop checks act a step later).
    pipeline_depth: int = 2
    max_num_waiting: int = 4096  # past this many waiting requests, Generate is RESOURCE_EXHAUSTED
    step_timeout_s: float = 60.0  # deadline of one Step RPC; a worker past it counts as lost
    rpc_timeout_s: float = 5.0  # deadline of Describe, StartSession and Ping
    reconnect_interval_s: float = 0.5  # between attempts to reach a lost worker
    ping_interval_s: float = 1.0  # while idle, how often the workers are probed
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    max_prompt_tokens: int | None = None  # None: max_model_len is the only limit
    max_output_tokens: int | None = None  # cap on sampling.max_tokens; None: max_model_len
    max_num_streams: int = 1024  # live Generate calls; past it, RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 << 20  # largest public request (a long prompt as token ids)
    max_stream_buffer: int = 1024  # undelivered step outputs per stream before it is aborted
    max_num_stop: int = 64  # stop strings plus stop token ids per request
    max_stop_chars: int = 1024  # longest stop string
    max_request_id_chars: int = 256
    tls_cert: str | None = None  # PEM files; both set: the public port speaks TLS only
    tls_key: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    auth_health: bool = False  # True: health and reflection need the token too
    worker_secret: str | None = field(default=None, repr=False)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: OS picks); None: off
    step_trace: str | None = None  # benchmarks: each step's host phases go to STEP_TRACE.scheduler
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.worker_addrs:
            raise ValueError("workers is empty: at least one HOST:PORT is required")
        if self.max_num_waiting < 1:
            raise ValueError(f"max_num_waiting={self.max_num_waiting} is invalid: must be >= 1")
        for name in ("step_timeout_s", "rpc_timeout_s", "reconnect_interval_s", "ping_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be > 0")
        for name in _POSITIVE_LIMITS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is invalid: must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            pipeline_depth=self.pipeline_depth,
        )

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> SchedulerServiceConfig:
        """The flags, each defaulting to its NANOSERVE_* variable (envargs); no secrets."""
        args = apply_env_defaults(_parser()).parse_args(argv)
        return cls(
            model_dir=args.model,
            worker_addrs=tuple(a.strip() for a in args.workers.split(",") if a.strip()),
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            enable_prefix_caching=not args.no_prefix_caching,
            pipeline_depth=args.pipeline_depth,
            max_num_waiting=args.max_num_waiting,
            step_timeout_s=args.step_timeout,
            drain_timeout_s=args.drain_timeout,
            max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens,
            max_num_streams=args.max_num_streams,
            max_message_bytes=args.max_message_bytes,
            max_stream_buffer=args.max_stream_buffer,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            auth_health=args.auth_health,
            metrics_port=args.metrics_port,
            step_trace=args.step_trace,
            log_level=args.log_level,
        )

    def with_secrets(self, environ: Mapping[str, str]) -> SchedulerServiceConfig:
        """This config with the bearer token and the worker secret from ``environ``."""
        return dataclasses.replace(
            self,
            auth_token=environ.get(AUTH_TOKEN_ENV) or None,
            worker_secret=environ.get(WORKER_SECRET_ENV) or None,
        )


def configure_logging(config: SchedulerServiceConfig) -> None:
    """The log format and ``config.log_level``, for the front end and the engine process alike."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


_POSITIVE_LIMITS = (
    "pipeline_depth",
    "max_prompt_tokens",
    "max_output_tokens",
    "max_num_streams",
    "max_message_bytes",
    "max_stream_buffer",
    "max_num_stop",
    "max_stop_chars",
    "max_request_id_chars",
)


def _parser() -> argparse.ArgumentParser:
    d = SchedulerServiceConfig
    p = argparse.ArgumentParser(
        prog="python -m scheduler_service",
        description="The CPU-side scheduler: serves nanoserve.v1.Generation, drives the workers.",
    )
    p.add_argument("--model", required=True, help="model directory (for the tokenizer)")
    p.add_argument("--workers", required=True, help="HOST:PORT[,HOST:PORT...], one per TP rank")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0: let the OS pick")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--pipeline-depth",
        type=int,
        default=d.pipeline_depth,
        help="step plans sent to the workers before waiting for an answer",
    )
    p.add_argument("--max-num-waiting", type=int, default=d.max_num_waiting)
    p.add_argument("--step-timeout", type=float, default=d.step_timeout_s, help="seconds")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, help="seconds")
    p.add_argument("--max-prompt-tokens", type=int, help="default: max_model_len")
    p.add_argument("--max-output-tokens", type=int, help="cap on max_tokens; default: none")
    p.add_argument("--max-num-streams", type=int, default=d.max_num_streams)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument(
        "--max-stream-buffer",
        type=int,
        default=d.max_stream_buffer,
        help="step outputs a client may leave unread before its request is aborted",
    )
    p.add_argument("--tls-cert", help="PEM certificate chain for the public port")
    p.add_argument("--tls-key", help="PEM private key for the public port")
    p.add_argument(
        "--auth-health",
        action="store_true",
        help=f"require the bearer token (${AUTH_TOKEN_ENV}) for health and reflection too",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (default: off)")
    p.add_argument(
        "--step-trace",
        metavar="PATH",
        help=f"benchmarks: trace every step to PATH{SCHEDULER_SUFFIX} (the workers' PATH beside it)",
    )
    p.add_argument("--log-level", default="INFO")
    return p
