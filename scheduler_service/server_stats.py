"""ServerStats: the scheduler's counters and gauges, as GetServerStatus reports them.

Immutable snapshots: the engine thread sends one with each step (EngineLoop), the front end's
loop reads whichever snapshot is current. Counters run across worker sessions (``with_base``).
Not here: protobuf (wire_public.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from scheduler_service.engine import EngineCore


@dataclass(frozen=True)
class ServerStats:
    ready: bool = False
    num_waiting: int = 0
    num_running: int = 0
    total_blocks: int = 0
    free_blocks: int = 0
    num_preemptions: int = 0  # these counters run across worker sessions
    num_generated_tokens: int = 0
    num_cache_hit_tokens: int = 0
    num_cache_query_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_cache_hit_tokens / max(1, self.num_cache_query_tokens)


def counters(engine: EngineCore, base: ServerStats) -> ServerStats:
    """``base``'s counters plus those of ``engine``'s session (gauges left at zero)."""
    blocks = engine.scheduler.block_manager
    return ServerStats(
        num_preemptions=base.num_preemptions + engine.scheduler.num_preemptions,
        num_generated_tokens=base.num_generated_tokens + engine.num_generated_tokens,
        num_cache_hit_tokens=base.num_cache_hit_tokens + blocks.num_cache_hit_tokens,
        num_cache_query_tokens=base.num_cache_query_tokens + blocks.num_cache_query_tokens,
    )


def snapshot(engine: EngineCore, base: ServerStats) -> ServerStats:
    """A live session's gauges and counters; EngineClient.stats overrides ``ready`` (draining)."""
    blocks = engine.scheduler.block_manager
    return ServerStats(
        ready=True,
        num_waiting=len(engine.scheduler.waiting),
        num_running=len(engine.scheduler.running),
        total_blocks=blocks.num_blocks,
        free_blocks=blocks.num_free_blocks,
        **counter_fields(counters(engine, base)),
    )


def minus(a: ServerStats, b: ServerStats) -> ServerStats:
    """``a``'s counters less ``b``'s (gauges left at zero): e.g. a session's warm-up uncounted."""
    fa, fb = counter_fields(a), counter_fields(b)
    return ServerStats(ready=False, **{k: fa[k] - fb[k] for k in fa})


def counter_fields(stats: ServerStats) -> dict[str, int]:
    return {
        "num_preemptions": stats.num_preemptions,
        "num_generated_tokens": stats.num_generated_tokens,
        "num_cache_hit_tokens": stats.num_cache_hit_tokens,
        "num_cache_query_tokens": stats.num_cache_query_tokens,
    }


def kv_cache_violation(engine: EngineCore) -> str | None:
    """With no request live, every block must be free with ref_count 0; else what is wrong."""
    scheduler = engine.scheduler
    try:
        scheduler.block_manager.check_invariants([*scheduler.running, *scheduler.waiting])
    except AssertionError as e:
        return str(e) or "check_invariants failed"
    blocks = scheduler.block_manager
    if blocks.num_free_blocks != blocks.num_blocks:
        return f"{blocks.num_blocks - blocks.num_free_blocks} blocks still held with no request"
    return None


class TokenRate:
    """Generated tokens per second over the last ``window_s`` seconds (thread-safe)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, int]] = deque()  # (time, tokens) per step

    def add(self, num_tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, num_tokens))
            while self._steps and self._steps[0][0] < now - self.window_s:
                self._steps.popleft()

    def per_second(self) -> float:
        horizon = time.monotonic() - self.window_s
        with self._lock:
            return sum(n for t, n in self._steps if t >= horizon) / self.window_s
