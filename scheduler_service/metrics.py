"""Prometheus metrics of the scheduler: request latencies, queue depths, KV cache, step time.

Three kinds of input, each fed from one place:
- per request (servicer, event loop): ``metrics.track_request()`` returns a ``RequestTimer``; call
  ``on_tokens(n)`` each time new tokens reach the client side and ``on_finish(reason)`` once.
  That gives TTFT, inter-token and end-to-end latency, and requests by finish reason.
- per step (engine thread): ``metrics.observe_step(seconds)`` for the step-time histogram.
- server state: ``metrics.track_stats(get_stats)`` registers a callable returning the engine
  loop's latest ``ServerStats``; it is read at scrape time, so gauges (running, waiting, KV blocks)
  and cumulative counters (preemptions, cache tokens, generated tokens) need no call sites and
  survive worker sessions (ServerStats already sums across them).

``start_http_server(port, host)`` serves ``/metrics`` (port 0: the OS picks; the bound port is
returned). Each Metrics owns its registry, so tests can run several servers in one process.
Not here: worker-side metrics (step compute time, memory) and anything protobuf.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "nanoserve"
# Latency buckets in seconds: fine at the low end (CPU tiny model, GPU decode), up to minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5)
FINISH_REASONS = ("stop", "length", "abort", "error")


class StatsLike(Protocol):
    """What the collector reads (scheduler_service.engine_loop.ServerStats has these fields)."""

    @property
    def ready(self) -> bool: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def total_blocks(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def num_preemptions(self) -> int: ...
    @property
    def num_generated_tokens(self) -> int: ...
    @property
    def num_cache_hit_tokens(self) -> int: ...
    @property
    def num_cache_query_tokens(self) -> int: ...


class RequestTimer:
    """Latency of one request, from submission to its last token (event loop side only)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self.start_s = clock()
        self.last_token_s: float | None = None
        self.num_tokens = 0
        self.finished = False

    def on_tokens(self, num_tokens: int) -> None:
        """``num_tokens`` new tokens arrived now. Tokens that arrive together are one step apart
        in the engine, so each after the first gets an equal share of the gap."""
        if num_tokens <= 0:
            return
        now = self._clock()
        if self.last_token_s is None:
            self._metrics.ttft.observe(now - self.start_s)
            num_gaps, gap_s = num_tokens - 1, 0.0
        else:
            num_gaps, gap_s = num_tokens, (now - self.last_token_s) / num_tokens
        for _ in range(num_gaps):
            self._metrics.inter_token.observe(gap_s)
        self.last_token_s = now
        self.num_tokens += num_tokens

    def on_finish(self, finish_reason: str | Enum | None) -> None:
        """The request ended: ``stop``, ``length``, ``abort`` (a FinishReason works too), or
        None for an error or a client that went away. Only the first call counts."""
        if self.finished:
            return
        self.finished = True
        reason = _reason_label(finish_reason)
        self._metrics.requests.labels(finish_reason=reason).inc()
        self._metrics.e2e.observe(self._clock() - self.start_s)
        self._metrics.output_tokens.observe(self.num_tokens)


class Metrics:
    """The scheduler's metrics on their own registry; see the module docstring for call sites."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Finished requests by finish reason", ["finish_reason"],
            registry=r,
        )  # fmt: skip
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)  # export zeros before the first request
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From submission to the first token",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Between consecutive tokens of a request",
            buckets=INTER_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "From submission to the last token",
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.output_tokens = Histogram(
            f"{PREFIX}_request_output_tokens", "Generated tokens per finished request",
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384), registry=r,
        )  # fmt: skip
        self.step_time = Histogram(
            f"{PREFIX}_step_time_seconds", "Wall time of one engine step (plan, RPC, outputs)",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.worker_step_time = Histogram(
            f"{PREFIX}_worker_step_time_seconds",
            "Time the worker (rank 0) spent executing one step: forward pass and sampling",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.worker_memory = Gauge(
            f"{PREFIX}_worker_memory_bytes",
            "Memory the worker (rank 0) holds: device memory allocated on a GPU, resident set on CPU",
            registry=r,
        )
        self._stats_collector = _StatsCollector()
        r.register(self._stats_collector)

    def track_request(self) -> RequestTimer:
        return RequestTimer(self)

    def observe_step(
        self, seconds: float, worker_seconds: float | None = None, worker_memory: int = 0
    ) -> None:
        self.step_time.observe(seconds)
        if worker_seconds is not None:
            self.worker_step_time.observe(worker_seconds)
        if worker_memory:
            self.worker_memory.set(worker_memory)

    def track_stats(self, get_stats: Callable[[], StatsLike]) -> None:
        """Read server state from ``get_stats()`` at every scrape."""
        self._stats_collector.get_stats = get_stats

    def start_http_server(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` in a daemon thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class _StatsCollector(Collector):
    def __init__(self) -> None:
        self.get_stats: Callable[[], StatsLike] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.get_stats is None:
            return
        s = self.get_stats()
        gauges = {
            "ready": ("1 when serving (readiness), else 0", float(s.ready)),
            "num_requests_running": ("Sequences in the running batch", s.num_running),
            "num_requests_waiting": ("Sequences waiting (new or preempted)", s.num_waiting),
            "kv_blocks_total": ("KV cache blocks of the current session", s.total_blocks),
            "kv_blocks_used": ("KV cache blocks in use", s.total_blocks - s.free_blocks),
            "kv_cache_usage_ratio": (
                "Fraction of KV cache blocks in use",
                (s.total_blocks - s.free_blocks) / max(1, s.total_blocks),
            ),
            "prefix_cache_hit_rate": (
                "Cached prompt tokens / prompt tokens looked up, since start",
                s.num_cache_hit_tokens / max(1, s.num_cache_query_tokens),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = {
            "preemptions": ("Sequences preempted (KV cache full)", s.num_preemptions),
            "generation_tokens": ("Generated tokens", s.num_generated_tokens),
            "prefix_cache_hit_tokens": (
                "Prompt tokens served by the cache",
                s.num_cache_hit_tokens,
            ),
            "prefix_cache_query_tokens": ("Prompt tokens looked up", s.num_cache_query_tokens),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _reason_label(finish_reason: str | Enum | None) -> str:
    if finish_reason is None:
        return "error"
    if isinstance(finish_reason, Enum):
        finish_reason = str(finish_reason.value)
    label = finish_reason.lower()
    return label if label in FINISH_REASONS else "error"
