"""GrpcWorkerClient: the EngineCore's ``WorkerClient`` over gRPC, for one or more TP ranks.

Each step plan is serialized once and sent to every rank in parallel (the same bytes: the session
id is shared); rank 0's answer is the result. Any failure to reach a rank, a Step past its
deadline, or a rank that lost the session (it was restarted) raises ``WorkerUnavailable``: the
caller then drops the engine, ``reconnect()``s and starts a fresh session. This module does not
retry on its own; retry policy belongs to the engine loop. With a worker secret, every call
carries it as ``authorization: Bearer <secret>`` metadata (the workers refuse calls without it).
With a step trace (benchmarks), rank 0's plans and answers note their hops (protos/step_trace.py).
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from protos import wire_worker
from protos.auth import MetadataInterceptor, bearer
from protos.nanoserve.worker.v1 import worker_pb2 as pb
from protos.nanoserve.worker.v1 import worker_pb2_grpc
from protos.step_plan import StepPlan, StepResult, WorkerInfo
from protos.step_trace import StepTrace
from scheduler_service.engine import WorkerClient

MAX_MESSAGE_BYTES = 1 << 30  # admitting many long prompts at once makes large plans
STEP_STREAM_METHOD = "/nanoserve.worker.v1.Worker/StepStream"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Pings find a silently dead link (no FIN) even while a long step is running.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted worker is found within a second, not after exponential backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
]
T = TypeVar("T")


class WorkerUnavailable(Exception):
    """A worker did not answer, answered with an error, or no longer holds our session."""


@dataclasses.dataclass
class StepTiming:
    """Where the last step's time went on the client side (nanoseconds, monotonic clock)."""

    start_ns: int = 0  # receive() entered
    serialize_ns: int = 0  # plan -> bytes (in submit())
    call_ns: int = 0  # from receive() entered until every rank has answered
    parse_ns: int = 0  # bytes -> StepResult
    compute_ns: int = 0  # what rank 0 reports for Worker.step itself
    worker_wire_ns: int = 0  # what rank 0 reports for decoding the plan and encoding its reply
    worker_memory_bytes: int = 0  # what rank 0 reports holding after the step
    end_ns: int = 0  # receive() returns
    step_id: int = -1  # the step whose tokens the answer carries (-1: none)

    def report(self) -> tuple[float | None, int]:
        """Rank 0's own account: seconds in Worker.step (None if it gave none) and memory."""
        return (self.compute_ns / 1e9 or None), self.worker_memory_bytes


class RemoteWorker(WorkerClient, Protocol):
    """The engine loop's worker: a WorkerClient that can be probed and reconnected, and that
    says where each step's time went."""

    timing: StepTiming  # the last receive()'s

    def ping(self) -> None: ...

    def reconnect(self) -> None: ...


class GrpcWorkerClient:
    def __init__(
        self,
        addrs: Sequence[str],
        step_timeout_s: float = 60.0,
        rpc_timeout_s: float = 5.0,
        secret: str | None = None,
        trace: StepTrace | None = None,
    ) -> None:
        if not addrs:
            raise ValueError("addrs is empty: at least one worker address is required")
        self.addrs = list(addrs)  # reordered by rank in describe()
        self.step_timeout_s = step_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.session_id = 0
        self.timing = StepTiming()
        self.trace = trace
        self._interceptors = [MetadataInterceptor(bearer(secret))] if secret else []
        self._channels: list[grpc.Channel] = []
        self._streams: list[StepStream] = []
        self._serialize_ns: deque[int] = deque()  # per plan sent and not yet answered
        self._open()

    def _open(self) -> None:
        self._channels = [
            grpc.intercept_channel(
                grpc.insecure_channel(a, options=CHANNEL_OPTIONS), *self._interceptors
            )
            for a in self.addrs
        ]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        for channel in self._channels:
            channel.close()
        self._streams, self._channels = [], []

    def reconnect(self) -> None:
        """Fresh channels (no inherited backoff); the session must be started again."""
        self.close()
        self.session_id = 0
        self._open()

    def describe(self) -> WorkerInfo:
        """Rank 0's facts, with the cache capacity every rank can hold; ranks are put in order."""
        request, timeout = pb.DescribeRequest(), self.rpc_timeout_s
        infos = [
            wire_worker.info_from_pb(self._call(i, stub.Describe, request, timeout=timeout))
            for i, stub in enumerate(self._stubs)
        ]
        world_size = len(self.addrs)
        if sorted(info.rank for info in infos) != list(range(world_size)) or any(
            info.world_size != world_size for info in infos
        ):
            found = [(a, i.rank, i.world_size) for a, i in zip(self.addrs, infos)]
            raise WorkerUnavailable(
                f"workers do not form one tensor-parallel group of {world_size}: "
                f"(address, rank, world_size) = {found}"
            )
        order = sorted(range(world_size), key=lambda i: infos[i].rank)
        if order != list(range(world_size)):
            self.addrs = [self.addrs[i] for i in order]
            self.reconnect()
            infos = [infos[i] for i in order]
        num_kv_blocks = min(info.num_kv_blocks for info in infos)
        return dataclasses.replace(infos[0], num_kv_blocks=num_kv_blocks)

    def start_session(self) -> None:
        session_id = secrets.randbits(63) | 1
        request = pb.StartSessionRequest(session_id=session_id)
        for i, stub in enumerate(self._stubs):
            self._call(i, stub.StartSession, request, timeout=self.rpc_timeout_s)
        for stream in self._streams:
            stream.close()
        self._streams = [
            StepStream(c, self.step_timeout_s, self.trace if rank == 0 else None)
            for rank, c in enumerate(self._channels)
        ]
        self._serialize_ns.clear()
        self.session_id = session_id

    def ping(self) -> None:
        """Raise WorkerUnavailable unless every rank answers and still holds our session."""
        for i, stub in enumerate(self._stubs):
            reply = self._call(i, stub.Ping, pb.PingRequest(), timeout=self.rpc_timeout_s)
            if reply.session_id != self.session_id:
                raise WorkerUnavailable(f"worker {self.addrs[i]} lost the session (restarted?)")

    def submit(self, plan: StepPlan) -> None:
        """Send a plan to every rank (the same bytes) without waiting for an answer."""
        if not self._streams:
            raise WorkerUnavailable("no session: call start_session first")
        start = time.perf_counter_ns()
        data = wire_worker.plan_to_pb(plan, self.session_id).SerializeToString()
        self._serialize_ns.append(time.perf_counter_ns() - start)
        for stream in self._streams:
            stream.send(data, plan.step_id)

    def receive(self) -> StepResult:
        """The answer to the oldest plan not yet answered: rank 0's (every rank must answer)."""
        if not self._streams:
            raise WorkerUnavailable("no session: call start_session first")
        start = time.perf_counter_ns()
        replies = [self._call(i, stream.receive) for i, stream in enumerate(self._streams)]
        received = time.perf_counter_ns()
        reply = pb.StepResponse.FromString(replies[0])
        if self.trace is not None:
            self.trace.hop(reply.step_id, "answered")
        result = wire_worker.result_from_pb(reply)
        end = time.perf_counter_ns()
        self.timing = StepTiming(
            start_ns=start,
            serialize_ns=self._serialize_ns.popleft() if self._serialize_ns else 0,
            call_ns=received - start,
            parse_ns=end - received,
            compute_ns=reply.compute_ns,
            worker_wire_ns=reply.wire_ns,
            worker_memory_bytes=reply.memory_bytes,
            end_ns=end,
            step_id=reply.step_id,
        )
        return result

    def _call(self, rank: int, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)`` on ``rank``; a gRPC failure becomes WorkerUnavailable."""
        try:
            return call(*args, **kwargs)
        except grpc.RpcError as e:
            code = e.code().name if isinstance(e, grpc.Call) else "ERROR"
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise WorkerUnavailable(f"worker {self.addrs[rank]}: {code}: {details}") from e


class StepStream:
    """One rank's long-lived StepStream call: plan bytes in, result bytes out, in order.

    gRPC streams have no per-message deadline, so a watchdog thread cancels the call when the
    oldest unanswered plan has waited longer than ``step_timeout_s``; ``receive`` then fails.
    With a ``trace``, each plan notes when it was queued and when gRPC's thread took it.
    """

    def __init__(
        self, channel: grpc.Channel, step_timeout_s: float, trace: StepTrace | None = None
    ) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._trace = trace
        self._step_ids: deque[int] = deque()  # traced: the queued plans' ids, oldest first
        plans = iter(self._requests.get, None)
        call = channel.stream_stream(STEP_STREAM_METHOD)  # raw bytes: serialized once for all
        self._responses = call(plans if trace is None else self._traced(plans, trace))
        self._timeout_ns = int(step_timeout_s * 1e9)
        self._sent_ns: deque[int] = deque()  # when each unanswered plan was sent, oldest first
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._watchdog.start()

    def send(self, data: bytes, step_id: int) -> None:
        self._sent_ns.append(time.monotonic_ns())
        if self._trace is not None:
            self._trace.hop(step_id, "sent")
            self._step_ids.append(step_id)
        self._requests.put(data)

    def _traced(self, plans: Iterator[bytes], trace: StepTrace) -> Iterator[bytes]:
        """``plans`` as gRPC's own thread drains them, each noting when it was taken."""
        for data in plans:
            trace.hop(self._step_ids.popleft(), "taken")
            yield data

    def receive(self) -> bytes:
        try:
            return next(self._responses)
        except StopIteration:
            raise WorkerUnavailable("the worker ended the step stream") from None
        finally:
            if self._sent_ns:
                self._sent_ns.popleft()

    def close(self) -> None:
        self._closed.set()
        self._requests.put(None)
        self._responses.cancel()

    def _watch(self) -> None:
        period = min(1.0, self._timeout_ns / 4e9)
        while not self._closed.wait(period):
            try:
                sent = self._sent_ns[0]
            except IndexError:  # nothing awaited (or receive() just took it)
                continue
            if time.monotonic_ns() - sent > self._timeout_ns:
                self._responses.cancel()  # receive() raises CANCELLED
                return
