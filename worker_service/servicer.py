"""The ``nanoserve.worker.v1.Worker`` servicer: protobuf in, ``Worker`` call, protobuf out.

Thin on purpose: decoding and encoding live in ``protos.wire_worker``, the work in
``Worker``. The servicer adds the one thing the in-process path does not need: sessions. A step
must name the session the scheduler started; a scheduler that lost this worker (or a worker that
was restarted) finds out from a FAILED_PRECONDITION instead of corrupting state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from protos import wire_worker
from protos.nanoserve.worker.v1 import worker_pb2 as pb
from protos.nanoserve.worker.v1 import worker_pb2_grpc
from protos.sampling_params import Constraint
from protos.step_plan import StepPlan, StepResult, WorkerInfo
from protos.step_trace import StepTrace, ms_since

log = logging.getLogger(__name__)


class StepExecutor(Protocol):
    """What the servicer needs from a worker (``Worker``, ``ProfiledWorker``)."""

    def describe(self) -> WorkerInfo: ...

    def start_session(self) -> None: ...

    def step(self, plan: StepPlan) -> StepResult: ...

    def memory_bytes(self) -> int:
        """What this rank holds now (reported with every step)."""
        ...

    def check_constraint(self, constraint: Constraint) -> str:
        """Compile ``constraint`` (cached): the compiler's message, "" when it compiled."""
        ...


def read_ahead(
    requests: Iterator[pb.StepRequest], trace: StepTrace | None = None
) -> queue.SimpleQueue[pb.StepRequest | None]:
    """The stream's requests, read (and parsed) by a thread of their own as they arrive; None
    once the stream ends or fails. The next plan is then already here when a step's answer has
    been sent, instead of being asked for only then: asking took the server's polling thread a
    round trip on the path between two steps (on an H200 at one user, that path went from
    0.18-0.19 to 0.14-0.15 ms a step at the median; BENCHMARKS.md). With a ``trace``, each
    plan notes when it was read."""
    plans: queue.SimpleQueue[pb.StepRequest | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            for request in requests:
                if trace is not None:
                    trace.hop(request.step_id, "read")
                plans.put(request)
        except grpc.RpcError:  # the scheduler cancelled the stream or went away
            pass
        finally:
            plans.put(None)

    threading.Thread(target=read, name="step-plans", daemon=True).start()
    return plans


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: StepExecutor, trace: StepTrace | None = None) -> None:
        """``trace``: the worker's step trace, which also gets the servicer's phases (benchmarks)."""
        self.worker = worker
        self.trace = trace
        self.session_id = 0
        self._lock = threading.Lock()  # one step (or session change) at a time

    def Describe(
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        return wire_worker.info_to_pb(self.worker.describe())

    def StartSession(
        self, request: pb.StartSessionRequest, context: grpc.ServicerContext
    ) -> pb.StartSessionResponse:
        if request.session_id == 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "session_id=0 is invalid: must be nonzero"
            )
        with self._lock:
            self.worker.start_session()
            self.session_id = request.session_id
        log.info("started session %x", request.session_id)
        return pb.StartSessionResponse()

    def CheckConstraint(
        self, request: pb.CheckConstraintRequest, context: grpc.ServicerContext
    ) -> pb.CheckConstraintResponse:
        """Outside the step lock: compiling runs beside the steps (the cache has its own)."""
        constraint = wire_worker.params_from_pb(request.params).constraint
        if constraint is None:
            return pb.CheckConstraintResponse()
        return pb.CheckConstraintResponse(error=self.worker.check_constraint(constraint))

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        return self._step(request, context)

    def StepStream(
        self, requests: Iterator[pb.StepRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StepResponse]:
        trace = self.trace
        plans = read_ahead(requests, trace)
        while True:
            waiting = time.perf_counter_ns()
            request = plans.get()
            if request is None:
                return
            if trace is not None:
                trace.note("plan_wait", ms_since(waiting))
                trace.hop(request.step_id, "handled")
            reply = self._step(request, context)
            if trace is not None:
                trace.hop(reply.step_id, "replied")
            yield reply

    def _step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        with self._lock:
            if request.session_id != self.session_id:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session_id={request.session_id:x} is not this worker's session "
                    f"({self.session_id:x}): call StartSession first",
                )
            start = time.perf_counter_ns()
            plan = wire_worker.plan_from_pb(request)
            decoded = time.perf_counter_ns()
            try:
                result = self.worker.step(plan)
            except Exception as e:  # the session's state is now unknown: refuse further steps
                self.session_id = 0
                log.exception("step %d failed", plan.step_id)
                context.abort(grpc.StatusCode.INTERNAL, f"step {plan.step_id} failed: {e!r}")
            computed = time.perf_counter_ns()
            reply = wire_worker.result_to_pb(result, computed - decoded)
            reply.wire_ns = decoded - start + time.perf_counter_ns() - computed
            reply.memory_bytes = self.worker.memory_bytes()
            if self.trace is not None:  # lands in the next step's line (this one's is written)
                self.trace.note("decode", (decoded - start) / 1e6)
                self.trace.note("encode", ms_since(computed))
        return reply

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse(session_id=self.session_id)
