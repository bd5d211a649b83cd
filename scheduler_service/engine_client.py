"""EngineClient: the front end's view of the engine process, for the servicers (event loop only).

The servicers call ``submit``, ``abort``, ``close`` and ``flush_cache``, subscribe to
``kv_events`` (kv_event_hub.py) and read ``info``, ``max_model_len``, ``stats`` and the token
rate; the client owns the per-request streams (request_streams.py) and sends commands to the
engine process (``commands``: engine_process.py's pipe, or anything with ``add``, ``abort``,
``flush``, ``kv_events``). The engine's events arrive as calls of the ``on_*`` methods, on the event
loop: ``on_update`` once per step hands every request its outputs at once.

Admission happens here, with what the front end knows: a request is refused while no session
serves (UNAVAILABLE), while draining, when its id is live, and when the streams or the waiting
queue (the engine's last count plus the adds it has not applied yet) are full
(RESOURCE_EXHAUSTED). A client that goes away (cancel, deadline) has its request aborted, which
frees its KV blocks in the engine's next iteration; so does one that stops reading (its stream
buffers at most ``max_stream_buffer`` step outputs). On worker loss every in-flight request fails
with ``Unavailable`` at once and readiness turns off until a fresh session serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Protocol

from protos.sampling_params import SamplingParams
from protos.step_plan import WorkerInfo
from scheduler_service.block_manager import KvEvent
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine import RequestOutput
from scheduler_service.engine_loop import StepReport
from scheduler_service.kv_event_hub import KvEventHub
from scheduler_service.metrics import Metrics
from scheduler_service.request_streams import OutputQueue, Overloaded, RequestStreams, Unavailable
from scheduler_service.server_stats import ServerStats, TokenRate


class EngineCommands(Protocol):
    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def flush(self, flush_id: int) -> None: ...

    def kv_events(self, wanted: bool) -> None: ...


class EngineClient:
    def __init__(
        self,
        config: SchedulerServiceConfig,
        commands: EngineCommands,
        on_ready_change: Callable[[bool], None] = lambda ready: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.commands = commands
        self.on_ready_change = on_ready_change
        self.metrics = metrics or Metrics()
        self._streams = RequestStreams(config.max_stream_buffer)
        self._info: WorkerInfo | None = None  # None while no session serves
        self._max_model_len = 0
        self._session = 0
        self._stats = ServerStats()
        self._num_sent_adds = 0
        self._num_applied_adds = 0
        self._draining = False
        self._token_rate = TokenRate()
        self.kv_events = KvEventHub(commands.kv_events)
        self._flushes: dict[int, asyncio.Future[bool]] = {}  # flush id -> its answer
        self._next_flush_id = 0

    # ---- for the servicers -----------------------------------------------------------------

    @property
    def info(self) -> WorkerInfo:
        return self._serving_info()

    @property
    def max_model_len(self) -> int:
        self._serving_info()
        return self._max_model_len

    @property
    def stats(self) -> ServerStats:
        return dataclasses.replace(self._stats, ready=self.ready)

    @property
    def ready(self) -> bool:
        return self._info is not None and not self._draining

    @property
    def num_streams(self) -> int:
        """Live Generate calls."""
        return len(self._streams)

    def generated_tokens_per_second(self) -> float:
        return self._token_rate.per_second()

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: bool = True,
    ) -> OutputQueue:
        """Queue a request checked at the edge (validate_request); its outputs (or an error)
        arrive on the returned queue (for ``stream=False``: the first output, then the rest at
        the end)."""
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is invalid: a live request has it")
        if self._draining:
            raise Unavailable("the server is draining: no new requests")
        self._serving_info()
        if len(self._streams) >= self.config.max_num_streams:
            raise Overloaded(
                f"{len(self._streams)} streams are live (--max-num-streams "
                f"{self.config.max_num_streams}): retry later"
            )
        pending = self._num_sent_adds - self._num_applied_adds
        if self._stats.num_waiting + pending >= self.config.max_num_waiting:
            raise Overloaded(
                f"the waiting queue is full ({self.config.max_num_waiting} requests): retry later"
            )
        queue = self._streams.open(request_id, self._session, stream)
        self._num_sent_adds += 1
        self.commands.add(request_id, prompt_token_ids, params)
        return queue

    def abort(self, request_ids: list[str]) -> list[str]:
        """Abort live requests; return those that were live (their streams end with ABORT)."""
        found = [r for r in request_ids if r in self._streams]
        if found:
            self.commands.abort(found)
        return found

    def close(self, request_id: str, finished: bool) -> None:
        """The caller is done with a request's stream; abort the request unless it finished."""
        if self._streams.close(request_id) and not finished:
            self.commands.abort([request_id])

    async def flush_cache(self) -> bool:
        """Forget every cached prefix block, if none is in use (else False, as with no session:
        BlockManager.reset_prefix_cache)."""
        if self._info is None:
            return False
        flush_id, self._next_flush_id = self._next_flush_id, self._next_flush_id + 1
        self._flushes[flush_id] = asyncio.get_running_loop().create_future()
        try:
            self.commands.flush(flush_id)
            return await self._flushes[flush_id]
        finally:
            del self._flushes[flush_id]

    def drain(self) -> None:
        """Refuse new requests from now on; in-flight ones go on."""
        self._draining = True
        self.on_ready_change(False)

    # ---- the engine's events ---------------------------------------------------------------

    def on_session(self, info: WorkerInfo, max_model_len: int, session: int) -> None:
        self._info, self._max_model_len, self._session = info, max_model_len, session
        self.on_ready_change(self.ready)

    def _serving_info(self) -> WorkerInfo:
        if self._info is None:
            raise Unavailable("no worker answers: the server is not ready")
        return self._info

    def engine_gone(self) -> None:
        """The engine process exited: every live request fails, readiness turns off for good."""
        self._stop_serving(Unavailable("the engine process exited"), self._session)
        for future in self._flushes.values():  # nothing will answer them
            if not future.done():
                future.set_result(False)

    def on_lost(self, reason: str, session: int, stats: ServerStats) -> None:
        self._stats = stats
        self._stop_serving(Unavailable(f"worker lost: {reason}"), session)

    def _stop_serving(self, error: Exception, session: int) -> None:
        """Readiness off; the streams of ``session`` and earlier fail with ``error``."""
        self._info = None
        self.on_ready_change(False)
        self._streams.fail_all(error, session)

    def on_refused(self, request_id: str, error: Exception) -> None:
        self._streams.fail(request_id, error)

    def on_flushed(self, flush_id: int, done: bool) -> None:
        future = self._flushes.get(flush_id)
        if future is not None and not future.done():
            future.set_result(done)

    def on_kv_events(self, events: list[KvEvent]) -> None:
        self.kv_events.publish(events)

    def on_update(
        self,
        outputs: list[RequestOutput],
        stats: ServerStats,
        num_adds: int,
        step: StepReport | None,
    ) -> None:
        self._stats = stats
        self._num_applied_adds = max(self._num_applied_adds, num_adds)
        if step is not None:
            self.metrics.observe_step(step.seconds, step.worker_seconds, step.worker_memory)
            self._token_rate.add(step.num_new_tokens)
        if outputs:
            dropped = self._streams.deliver(outputs)
            if dropped:  # their clients stopped reading: free their blocks
                self.commands.abort(dropped)
