"""EngineLoop: runs the synchronous EngineCore in its own thread, for the asyncio gRPC servicer.

Threads and ownership:
- The engine thread owns the EngineCore: it applies queued commands (add, abort), steps while
  there is work, pings the workers while idle, and on worker loss drops the engine and keeps trying
  to reconnect and start a fresh session.
- The event loop (the servicer's thread) owns the per-request streams. ``submit`` and ``abort`` are
  called there; the engine thread hands outputs back with ``call_soon_threadsafe``, one callback
  per step.
A client that goes away (cancel, deadline) has its request aborted, which frees its KV blocks in
the next iteration of the engine thread. So does one that stops reading: its stream buffers at
most ``max_stream_buffer`` step outputs, past which the request is aborted (the step loop never
waits for a client). On worker loss every in-flight request fails with ``Unavailable`` at once
and readiness turns off until a fresh session is up. Whenever the engine falls idle it checks
that every KV block is free (``kv_cache_violation``) and logs an error if not.

Not here: protobuf (the servicer's edge), tokenization, what a command does to the engine
(engine_commands.py), and scheduling itself (EngineCore).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from protos.sampling_params import SamplingParams
from protos.step_plan import WorkerInfo
from protos.step_trace import StepTrace
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine import EngineCore, RequestOutput
from scheduler_service.engine_commands import AbortRequest, AddRequest, Command, apply_commands
from scheduler_service.metrics import Metrics
from scheduler_service.request_streams import (
    OutputQueue,
    Overloaded,
    RequestStreams,
    SlowClient,
    Unavailable,
)
from scheduler_service.server_stats import (
    ServerStats,
    TokenRate,
    counter_fields,
    counters,
    kv_cache_violation,
    snapshot,
)
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.worker_client import RemoteWorker, WorkerUnavailable

log = logging.getLogger(__name__)
__all__ = ["EngineLoop", "Overloaded", "ServerStats", "SlowClient", "Unavailable"]


class EngineLoop:
    def __init__(
        self,
        config: SchedulerServiceConfig,
        worker: RemoteWorker,
        tokenizer: Tokenizer,
        loop: asyncio.AbstractEventLoop,
        on_ready_change: Callable[[bool], None] = lambda ready: None,
        metrics: Metrics | None = None,
        trace: StepTrace | None = None,  # one for every session's EngineCore
    ) -> None:
        self.metrics = metrics or Metrics()
        self.trace = trace
        self.config = config
        self.worker = worker
        self.tokenizer = tokenizer
        self.on_ready_change = on_ready_change  # called on the event loop
        self.stats = ServerStats()  # replaced (never mutated) by the engine thread
        self._loop = loop
        self._engine: EngineCore | None = None  # written by the engine thread only
        self._streams = RequestStreams(config.max_stream_buffer)  # event loop only
        self._cond = threading.Condition()  # guards the fields below
        self._session = 0  # counts worker sessions
        self._commands: list[Command] = []
        self._num_pending_adds = 0
        self._stopping = False
        self._draining = False
        self._base = ServerStats()  # counters of the sessions before the current one
        self._token_rate = TokenRate()
        self._num_failed_starts = 0  # engine thread only
        self._idle_checked = False  # engine thread only: KV invariants checked since last step
        self.num_invariant_violations = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---- event loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def info(self) -> WorkerInfo:
        return self._current_engine().info

    @property
    def max_model_len(self) -> int:
        return self._current_engine().max_model_len

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: bool = True,
    ) -> OutputQueue:
        """Queue a request checked at the edge (validate_request); its outputs (or an error)
        arrive on the returned queue (for ``stream=False``: the first output, then the rest at
        the end). Refused here: a request_id a live request has, and requests past capacity."""
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is invalid: a live request has it")
        if len(self._streams) >= self.config.max_num_streams:
            raise Overloaded(
                f"{len(self._streams)} streams are live (--max-num-streams "
                f"{self.config.max_num_streams}): retry later"
            )
        with self._cond:
            self._check_accepting()
            session = self._session
            if self.stats.num_waiting + self._num_pending_adds >= self.config.max_num_waiting:
                raise Overloaded(
                    f"the waiting queue is full ({self.config.max_num_waiting} requests): "
                    "retry later"
                )
            self._commands.append(AddRequest(request_id, prompt_token_ids, params))
            self._num_pending_adds += 1
            self._cond.notify()
        return self._streams.open(request_id, session, stream)

    def abort(self, request_ids: list[str]) -> list[str]:
        """Abort live requests; return those that were live (their streams end with ABORT)."""
        found = [r for r in request_ids if r in self._streams]
        self._send_aborts(found)
        return found

    def _send_aborts(self, request_ids: list[str]) -> None:
        with self._cond:
            self._commands.extend(AbortRequest(r) for r in request_ids)
            self._cond.notify()

    def close(self, request_id: str, finished: bool) -> None:
        """The caller is done with a request's stream; abort the request unless it finished."""
        if self._streams.close(request_id) and not finished:
            self._send_aborts([request_id])

    @property
    def num_streams(self) -> int:
        """Live Generate calls (event loop only)."""
        return len(self._streams)

    def drain(self) -> None:
        """Refuse new requests from now on; in-flight ones go on."""
        with self._cond:
            self._draining = True
        self.on_ready_change(False)

    def stop(self) -> None:
        """Stop the engine thread (blocks until it has finished its step; call off the loop)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def generated_tokens_per_second(self) -> float:
        return self._token_rate.per_second()

    def _current_engine(self) -> EngineCore:
        engine = self._engine
        if engine is None:
            raise Unavailable("no worker answers: the server is not ready")
        return engine

    def _check_accepting(self) -> None:
        if self._draining or self._stopping:
            raise Unavailable("the server is draining: no new requests")
        if self._engine is None:
            raise Unavailable("no worker answers: the server is not ready")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        dropped = self._streams.deliver(outputs)
        if dropped:  # their clients stopped reading: free their blocks
            self._send_aborts(dropped)

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if self._engine is None:
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
        except Exception as e:
            if self._num_failed_starts % 20 == 0:  # the first failure, then every ~10 s
                log.warning("workers %s not ready: %s", ",".join(self.config.worker_addrs), e)
            self._num_failed_starts += 1
            return False
        self._num_failed_starts = 0
        with self._cond:
            self._engine = engine
            self._session += 1
        self._publish_stats(engine)
        log.info(
            "session started: %s, %d KV blocks of %d tokens, max_model_len %d",
            engine.info.model_name,
            engine.info.num_kv_blocks,
            engine.info.block_size,
            engine.max_model_len,
        )
        self._loop.call_soon_threadsafe(self.on_ready_change, not self._draining)
        return True

    def _apply_commands(self, engine: EngineCore) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
        if not commands:
            return
        applied = apply_commands(engine, commands)
        for request_id, error in applied.refused:
            self._loop.call_soon_threadsafe(self._streams.fail, request_id, error)
        if applied.aborted:
            self._loop.call_soon_threadsafe(self._deliver, applied.aborted)
        self._publish_stats(engine)
        with self._cond:  # only now: until the stats count them, they count as pending
            self._num_pending_adds -= applied.num_adds

    def _step(self, engine: EngineCore) -> None:
        num_before, num_answers = engine.num_generated_tokens, engine.timings["steps"]
        t0 = time.perf_counter()
        outputs = engine.step()
        received = engine.timings["steps"] > num_answers  # the worker answered in this step
        worker_s, worker_memory = self.worker.timing.report() if received else (None, 0)
        self.metrics.observe_step(time.perf_counter() - t0, worker_s, worker_memory)
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs)
        self._token_rate.add(engine.num_generated_tokens - num_before)
        self._publish_stats(engine)

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
        with self._cond:
            self._engine = None
            self._commands = []
            self._num_pending_adds = 0
        if engine is not None:
            self._base = counters(engine, self._base)
        self.stats = ServerStats(ready=False, **counter_fields(self._base))
        self._loop.call_soon_threadsafe(self.on_ready_change, False)
        error = Unavailable(f"worker lost: {reason}")
        self._loop.call_soon_threadsafe(self._streams.fail_all, error, self._session)

    def _publish_stats(self, engine: EngineCore) -> None:
        self.stats = snapshot(engine, self._base, ready=not self._draining)
