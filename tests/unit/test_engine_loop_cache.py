"""EngineLoop's prefix-cache commands: a flush is answered by id (false with no session), and a
subscribed loop's fresh session tells the front end ``CacheCleared`` before anything else.

The worker is FlakyWorker (no step is ever sent), warm-up is skipped; the events are recorded.
"""

from __future__ import annotations

import threading
import time

from scheduler_service import engine_loop as engine_loop_module
from scheduler_service.block_manager import CacheCleared, KvEvent
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine_loop import EngineLoop
from tests.unit.test_step_trace_ownership import FlakyWorker


class Recorder:
    def __init__(self) -> None:
        self.sessions: list[int] = []
        self.flushes: list[tuple[int, bool]] = []
        self.kv: list[list[KvEvent]] = []
        self.changed = threading.Event()

    def session(self, info, max_model_len, session) -> None:
        self.sessions.append(session)
        self.changed.set()

    def lost(self, reason, session, stats) -> None:
        pass

    def refused(self, request_id, error) -> None:
        pass

    def update(self, outputs, stats, num_adds, step) -> None:
        pass

    def flushed(self, flush_id: int, done: bool) -> None:
        self.flushes.append((flush_id, done))
        self.changed.set()

    def kv_events(self, events: list[KvEvent]) -> None:
        self.kv.append(events)
        self.changed.set()


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start_loop(monkeypatch, num_losses: int, subscribed: bool) -> tuple[EngineLoop, Recorder]:
    monkeypatch.setattr(engine_loop_module, "warm_up", lambda engine: None)
    config = SchedulerServiceConfig(
        model_dir="m", worker_addrs=("a:1",), ping_interval_s=0.01, reconnect_interval_s=0.01
    )
    events = Recorder()
    loop = EngineLoop(config, FlakyWorker(num_losses), None, events)  # type: ignore[arg-type]
    loop.kv_events(subscribed)
    loop.start()
    return loop, events


def test_a_flush_is_answered_by_id_once_a_session_serves(monkeypatch) -> None:
    loop, events = start_loop(monkeypatch, 0, subscribed=False)
    try:
        wait_until(lambda: events.sessions == [1])
        loop.flush(5)
        wait_until(lambda: events.flushes == [(5, True)])
        assert events.kv == []  # nobody subscribes: no KV events
    finally:
        loop.stop()


def test_a_flush_with_no_session_is_answered_false() -> None:
    config = SchedulerServiceConfig(model_dir="m", worker_addrs=("a:1",))
    events = Recorder()
    loop = EngineLoop(config, FlakyWorker(0), None, events)  # type: ignore[arg-type]
    loop.flush(9)
    loop._refuse_adds()  # what the engine thread does while no session serves
    assert events.flushes == [(9, False)]


def test_every_fresh_session_starts_a_subscribers_events_with_cache_cleared(monkeypatch) -> None:
    loop, events = start_loop(monkeypatch, 2, subscribed=True)  # two losses: three sessions
    try:
        wait_until(lambda: len(events.sessions) == 3)
        wait_until(lambda: len(events.kv) == 3)
        assert events.kv == [[CacheCleared()]] * 3
    finally:
        loop.stop()
