"""SchedulerServiceConfig: every setting of the scheduler process, built once from flags in main().

The engine's own knobs (batch budgets, max_model_len, prefix caching) are an EngineConfig, derived
as a property; the rest concern the service: addresses, queue limit, timeouts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from scheduler_service.engine import EngineConfig


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
    max_num_waiting: int = 4096  # past this many waiting requests, Generate is RESOURCE_EXHAUSTED
    step_timeout_s: float = 60.0  # deadline of one Step RPC; a worker past it counts as lost
    rpc_timeout_s: float = 5.0  # deadline of Describe, StartSession and Ping
    reconnect_interval_s: float = 0.5  # between attempts to reach a lost worker
    ping_interval_s: float = 1.0  # while idle, how often the workers are probed
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.worker_addrs:
            raise ValueError("workers is empty: at least one HOST:PORT is required")
        if self.max_num_waiting < 1:
            raise ValueError(f"max_num_waiting={self.max_num_waiting} is invalid: must be >= 1")
        for name in ("step_timeout_s", "rpc_timeout_s", "reconnect_interval_s", "ping_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be > 0")

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> SchedulerServiceConfig:
        args = _parser().parse_args(argv)
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
            max_num_waiting=args.max_num_waiting,
            step_timeout_s=args.step_timeout,
            drain_timeout_s=args.drain_timeout,
            log_level=args.log_level,
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
    p.add_argument("--max-num-waiting", type=int, default=d.max_num_waiting)
    p.add_argument("--step-timeout", type=float, default=d.step_timeout_s, help="seconds")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, help="seconds")
    p.add_argument("--log-level", default="INFO")
    return p
