"""ConstraintChecker: a request's structured-output constraint compiled before it is admitted.

xgrammar imports torch, so the scheduler cannot compile grammars itself: it asks a worker
(``Worker.CheckConstraint``), which compiles against the model's vocabulary and keeps the result
for the sequences that will use it. A constraint that does not compile is a ValueError naming the
field with the compiler's message (INVALID_ARGUMENT at the servicer): it never enters the engine.
A worker that does not answer is ``Unavailable``. Both servicers share one checker.
"""

from __future__ import annotations

import grpc

from protos import wire_worker
from protos.auth import bearer
from protos.nanoserve.worker.v1 import worker_pb2 as pb
from protos.nanoserve.worker.v1 import worker_pb2_grpc
from protos.sampling_params import SamplingParams
from scheduler_service.request_checks import compile_error
from scheduler_service.request_streams import Unavailable

CHECK_TIMEOUT_S = 60.0  # a large schema on a large vocabulary compiles in seconds


class ConstraintChecker:
    def __init__(self, worker_addr: str, secret: str | None = None) -> None:
        """``worker_addr``: any worker of the group (each holds the model's tokenizer files)."""
        self.worker_addr = worker_addr
        self._metadata = bearer(secret) if secret else None
        self._stub: worker_pb2_grpc.WorkerStub | None = None  # made in the serving event loop

    async def check(self, params: SamplingParams, field: str = "sampling") -> None:
        """Nothing for an unconstrained request; else compile on the worker, or raise."""
        constraint = params.constraint
        if constraint is None:
            return
        if self._stub is None:
            self._stub = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(self.worker_addr))
        request = pb.CheckConstraintRequest(params=wire_worker.params_to_pb(params))
        try:
            response = await self._stub.CheckConstraint(
                request, timeout=CHECK_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise Unavailable(
                f"no worker answered the constraint check ({e.code().name}): {e.details()}"
            ) from None
        if response.error:
            raise compile_error(constraint, response.error, field)
