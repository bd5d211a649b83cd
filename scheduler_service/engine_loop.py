"""EngineLoop: the engine thread of the engine process, which owns the synchronous EngineCore.

The scheduler service is two processes (engine_process.py): the front end (gRPC servicers,
request streams: engine_client.py) and the engine process, whose engine thread runs this loop.
It applies queued commands (add, abort, flush), steps while there is work, pings the workers
while idle, and on worker loss drops the engine and keeps trying to reconnect and start a fresh
session. A fresh session is warmed up (warm_up.py: every kernel variant the limits allow compiles and runs
once) before it is announced, so readiness turns SERVING only once a first request runs at speed.

What the front end must hear goes to ``events`` (``EngineEvents``), all from this thread: one
``update`` per step (the outputs, the stats after it and the step's timing), ``refused`` for an
add the engine cannot take, ``flushed`` with each flush's outcome (False with no session),
``kv_events`` with the BlockManager's KV events of a step (only while ``kv_events(True)``, i.e. a
subscriber exists; a fresh session starts with ``CacheCleared``), ``session`` once a session
serves and ``lost`` when it is gone. ``add``, ``abort``, ``flush``, ``kv_events`` and ``stop`` may
be called from any thread. Whenever the engine falls idle it checks that every KV block is free
(``kv_cache_violation``) and logs an error if not.

Not here: protobuf, tokenization, the per-request streams (engine_client.py), what a command does
to the engine (engine_commands.py), and scheduling itself (EngineCore).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from protos.sampling_params import SamplingParams
from protos.step_plan import WorkerInfo
from protos.step_trace import StepTrace
from scheduler_service.block_manager import CacheCleared, KvEvent
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine import EngineCore, RequestOutput
from scheduler_service.engine_commands import (
    AbortRequest,
    AddRequest,
    Command,
    FlushCache,
    apply_commands,
)
from scheduler_service.request_streams import Unavailable
from scheduler_service.server_stats import (
    ServerStats,
    counters,
    kv_cache_violation,
    minus,
    snapshot,
)
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.warm_up import warm_up
from scheduler_service.worker_client import RemoteWorker, WorkerUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """One step's timing for the metrics: the engine's step and the worker's own time."""

    seconds: float
    worker_seconds: float | None
    worker_memory: int
    num_new_tokens: int
    step_id: int = -1  # the worker's answer this step took in (-1: none)


class EngineEvents(Protocol):
    """What the engine thread tells the front end (EngineClient's ``on_*`` methods, over a pipe)."""

    def session(self, info: WorkerInfo, max_model_len: int, session: int) -> None: ...

    def lost(self, reason: str, session: int, stats: ServerStats) -> None: ...

    def refused(self, request_id: str, error: Exception) -> None: ...

    def flushed(self, flush_id: int, done: bool) -> None: ...

    def kv_events(self, events: list[KvEvent]) -> None: ...

    def update(
        self,
        outputs: list[RequestOutput],
        stats: ServerStats,
        num_adds: int,  # AddRequests applied so far (refused ones included)
        step: StepReport | None,
    ) -> None: ...


class EngineLoop:
    def __init__(
        self,
        config: SchedulerServiceConfig,
        worker: RemoteWorker,
        tokenizer: Tokenizer,
        events: EngineEvents,
        trace: StepTrace | None = None,  # one for every session's EngineCore
    ) -> None:
        self.trace = trace
        self.config = config
        self.worker = worker
        self.tokenizer = tokenizer
        self.events = events
        self._engine: EngineCore | None = None  # engine thread only
        self._cond = threading.Condition()  # guards the fields below
        self._session = 0  # counts worker sessions
        self._commands: list[Command] = []
        self._stopping = False
        self._kv_events_wanted = False  # a subscriber exists: the BlockManager collects events
        # Counters of the sessions before the current one; never ready, gauges zero: the stats
        # sent as they are while no session is up.
        self._base = ServerStats()
        self._num_adds = 0  # engine thread only
        self._num_failed_starts = 0  # engine thread only
        self._idle_checked = False  # engine thread only: KV invariants checked since last step
        self.num_invariant_violations = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request checked at the edge (validate_request)."""
        with self._cond:
            self._commands.append(AddRequest(request_id, prompt_token_ids, params))
            self._cond.notify()

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._commands.extend(AbortRequest(r) for r in request_ids)
            self._cond.notify()

    def flush(self, flush_id: int) -> None:
        """Queue a prefix-cache flush; ``events.flushed(flush_id, done)`` answers it."""
        with self._cond:
            self._commands.append(FlushCache(flush_id))
            self._cond.notify()

    def kv_events(self, wanted: bool) -> None:
        """Collect the BlockManager's KV events (from the next step on) or stop collecting."""
        self._kv_events_wanted = wanted

    def stop(self) -> None:
        """Stop the engine thread (blocks until it has finished its step)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if self._engine is None:
                self._refuse_adds()
                if not self._start_session():
                    self._sleep(self.config.reconnect_interval_s)
                continue
            try:
                self._apply_commands(self._engine)
                if self._engine.has_unfinished:
                    self._step(self._engine)
                    self._idle_checked = False
                elif not self._idle_checked:
                    self._check_idle(self._engine)
                elif not self._wait_for_commands(self.config.ping_interval_s):
                    self.worker.ping()
            except WorkerUnavailable as e:
                self._lose_worker(str(e))
            except Exception as e:  # a bug or a worker error: the engine's state is unknown
                log.exception("engine step failed")
                self._lose_worker(f"engine error: {e!r}")

    def _check_idle(self, engine: EngineCore) -> None:
        self._idle_checked = True
        violation = kv_cache_violation(engine)
        if violation is not None:
            self.num_invariant_violations += 1
            log.error("KV cache invariant violated with no live request: %s", violation)

    def _start_session(self) -> bool:
        try:
            self.worker.reconnect()
            engine = EngineCore(self.config.engine_config, self.worker, self.tokenizer, self.trace)
            started = time.perf_counter()
            warm_up(engine)
        except Exception as e:
            if self._num_failed_starts % 20 == 0:  # the first failure, then every ~10 s
                log.warning("workers %s not ready: %s", ",".join(self.config.worker_addrs), e)
            self._num_failed_starts += 1
            return False
        self._num_failed_starts = 0
        self._base = minus(self._base, counters(engine, ServerStats()))  # warm-up uncounted
        if self._kv_events_wanted:
            engine.scheduler.block_manager.kv_events = [CacheCleared()]
        with self._cond:
            self._engine = engine
            self._session += 1
        log.info(
            "session started: %s, %d KV blocks of %d tokens, max_model_len %d (warm-up %.1f s)",
            engine.info.model_name,
            engine.info.num_kv_blocks,
            engine.info.block_size,
            engine.max_model_len,
            time.perf_counter() - started,
        )
        self.events.session(engine.info, engine.max_model_len, self._session)
        self._publish(engine, [], None)
        return True

    def _refuse_adds(self) -> None:
        """With no session, queued adds fail at once (aborts have nothing to abort)."""
        with self._cond:
            commands, self._commands = self._commands, []
        adds = [c for c in commands if isinstance(c, AddRequest)]
        for cmd in adds:
            self.events.refused(cmd.request_id, Unavailable("no worker answers: not ready"))
        for flush in (c for c in commands if isinstance(c, FlushCache)):
            self.events.flushed(flush.flush_id, False)
        if adds:
            self._num_adds += len(adds)
            self.events.update([], self._base, self._num_adds, None)

    def _apply_commands(self, engine: EngineCore) -> None:
        blocks = engine.scheduler.block_manager
        if self._kv_events_wanted != (blocks.kv_events is not None):
            blocks.kv_events = [] if self._kv_events_wanted else None
        with self._cond:
            commands, self._commands = self._commands, []
        if not commands:
            return
        applied = apply_commands(engine, commands)
        for request_id, error in applied.refused:
            self.events.refused(request_id, error)
        self._num_adds += applied.num_adds
        self._publish(engine, applied.aborted, None)  # a flush's removals reach subscribers first
        for flush_id, done in applied.flushed:
            self.events.flushed(flush_id, done)

    def _step(self, engine: EngineCore) -> None:
        num_before, num_answers = engine.num_generated_tokens, engine.timings["steps"]
        t0 = time.perf_counter()
        outputs = engine.step()
        received = engine.timings["steps"] > num_answers  # the worker answered in this step
        worker_s, worker_memory = self.worker.timing.report() if received else (None, 0)
        num_new = engine.num_generated_tokens - num_before
        step_id = self.worker.timing.step_id if received and num_new else -1
        step = StepReport(time.perf_counter() - t0, worker_s, worker_memory, num_new, step_id)
        self._publish(engine, outputs, step)

    def _publish(
        self, engine: EngineCore, outputs: list[RequestOutput], step: StepReport | None
    ) -> None:
        blocks = engine.scheduler.block_manager
        if blocks.kv_events:  # one message per step, sent only while someone subscribes
            kv_events, blocks.kv_events = blocks.kv_events, []
            self.events.kv_events(kv_events)
        self.events.update(outputs, snapshot(engine, self._base), self._num_adds, step)

    def _wait_for_commands(self, timeout: float) -> bool:
        """Block until a command arrives (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._commands) or self._stopping, timeout)

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, seconds)

    def _lose_worker(self, reason: str) -> None:
        log.error("worker lost: %s", reason)
        engine = self._engine
        self._engine = None
        if engine is not None:
            self._base = counters(engine, self._base)
        self.events.lost(reason, self._session, self._base)
