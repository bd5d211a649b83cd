"""The engine process: the scheduler service's EngineLoop, in an interpreter of its own.

The front end (gRPC servicers, the request streams) writes a message per stream per step: with
256 streams, thousands of Python-level writes a second. Sharing one interpreter (one GIL) with
the engine thread, those writes delayed every step plan (measured on an H200, nano_bench_256
streaming: the GPU sat idle 23% of the run). So the engine loop runs in a child process, and the
front end only hands requests over and outputs out.

Wire: one duplex pipe (``multiprocessing.Pipe``, a Unix socket pair carrying pickled tuples).
Front end to engine: ``("add", request_id, prompt_token_ids, params)``, ``("abort", ids)``,
``("flush", flush_id)``, ``("kv_events", wanted)``, ``("stop",)``. Engine to front end: ``(event, *args)`` for each ``EngineEvents`` call, in order;
the front end's reader thread hands each to the event loop as ``EngineClient.on_<event>(*args)``,
so a step's outputs cost one message, not one per request. With a step trace (benchmarks) a
step's outputs note when the engine thread sent them, when the reader thread had them and when
the event loop took them up (protos/step_trace.py, ``HOPS``).
The engine process ignores SIGINT and SIGTERM (the front end drains, then sends ``stop``) and
exits when the pipe closes (the front end is gone). If it exits on its own, the front end fails
every live request and stops (``on_exit``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from protos.sampling_params import SamplingParams
from protos.step_plan import WorkerInfo
from protos.step_trace import SCHEDULER_SUFFIX, StepTrace, open_trace
from scheduler_service.block_manager import KvEvent
from scheduler_service.config import SchedulerServiceConfig, configure_logging
from scheduler_service.engine import RequestOutput
from scheduler_service.engine_loop import EngineLoop, StepReport
from scheduler_service.server_stats import ServerStats

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0


class EngineProcess:
    """The front end's handle on the engine process: start it, send commands, stop it."""

    def __init__(self, config: SchedulerServiceConfig, trace: StepTrace | None = None) -> None:
        """``trace``: the front end's step trace, for the outputs' hops (its owner closes it)."""
        self._trace = trace
        context = multiprocessing.get_context(
            "spawn"
        )  # no fork: grpc and threads do not survive it
        self._conn, self._child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_engine_main, args=(config, self._child_conn), name="engine", daemon=True
        )
        self._stopping = False

    def start(
        self, target: object, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]
    ) -> None:
        """Start the process; its events become calls of ``target.on_<event>`` on ``loop``, and
        its unexpected end a call of ``on_exit``."""
        self._process.start()
        self._child_conn.close()
        reader = threading.Thread(
            target=self._read, args=(target, loop, on_exit), name="engine-events", daemon=True
        )
        reader.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._send(("add", request_id, prompt_token_ids, params))

    def abort(self, request_ids: list[str]) -> None:
        self._send(("abort", request_ids))

    def flush(self, flush_id: int) -> None:
        self._send(("flush", flush_id))

    def kv_events(self, wanted: bool) -> None:
        self._send(("kv_events", wanted))

    def stop(self) -> None:
        """Ask the engine to stop (its step finishes) and wait for the process (blocking)."""
        self._stopping = True
        self._send(("stop",))
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %.0f s: killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError):
            if not self._stopping:
                log.error("the engine process is gone: %r dropped", message[0])

    def _read(
        self, target: object, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]
    ) -> None:
        trace = self._trace
        while True:
            try:
                event, *args = self._conn.recv()
            except (EOFError, OSError):
                break
            handler = getattr(target, f"on_{event}")
            if trace is None or (step_id := _step_id(event, args)) < 0:
                loop.call_soon_threadsafe(handler, *args)
            else:
                trace.hop(step_id, "received")
                loop.call_soon_threadsafe(self._dispatch, trace, handler, args, step_id)
        if not self._stopping:
            log.error("the engine process exited (code %s)", self._process.exitcode)
            loop.call_soon_threadsafe(on_exit)

    @staticmethod
    def _dispatch(trace: StepTrace, handler: Callable[..., None], args: list, step_id: int) -> None:
        trace.hop(step_id, "dispatched")
        handler(*args)


def _step_id(event: str, args: list) -> int:
    """The step whose tokens an ``update``'s outputs carry (-1: none, or another event)."""
    step = args[-1] if event == "update" else None
    return -1 if step is None else step.step_id


class _PipeEvents:
    """EngineEvents sent over the pipe (engine thread only)."""

    def __init__(self, conn: Connection, trace: StepTrace | None = None) -> None:
        self._conn = conn
        self._trace = trace

    def session(self, info: WorkerInfo, max_model_len: int, session: int) -> None:
        self._conn.send(("session", info, max_model_len, session))

    def lost(self, reason: str, session: int, stats: ServerStats) -> None:
        self._conn.send(("lost", reason, session, stats))

    def refused(self, request_id: str, error: Exception) -> None:
        self._conn.send(("refused", request_id, error))

    def flushed(self, flush_id: int, done: bool) -> None:
        self._conn.send(("flushed", flush_id, done))

    def kv_events(self, events: list[KvEvent]) -> None:
        self._conn.send(("kv_events", events))

    def update(
        self,
        outputs: list[RequestOutput],
        stats: ServerStats,
        num_adds: int,
        step: StepReport | None,
    ) -> None:
        if self._trace is not None and step is not None and step.step_id >= 0:
            self._trace.hop(step.step_id, "published")
        self._conn.send(("update", outputs, stats, num_adds, step))


def _engine_main(config: SchedulerServiceConfig, conn: Connection) -> None:
    from scheduler_service.tokenizer import Tokenizer
    from scheduler_service.worker_client import GrpcWorkerClient

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(config)
    trace_path = config.step_trace and config.step_trace + SCHEDULER_SUFFIX
    with open_trace(trace_path) as trace:
        tokenizer = Tokenizer.from_dir(config.model_dir)
        worker = GrpcWorkerClient(
            config.worker_addrs,
            config.step_timeout_s,
            config.rpc_timeout_s,
            config.worker_secret,
            trace,
        )
        engine_loop = EngineLoop(config, worker, tokenizer, _PipeEvents(conn, trace), trace)
        gc.freeze()  # what lives as long as the process stays out of the collector's full passes
        engine_loop.start()
        try:
            while True:
                try:
                    command, *args = conn.recv()
                except (EOFError, OSError):
                    break
                if command == "stop":
                    break
                getattr(engine_loop, command)(*args)
        finally:
            engine_loop.stop()
            worker.close()
