"""The worker reads a stream's next plan while a step runs (worker_service.servicer.read_ahead)."""

from __future__ import annotations

import threading

import grpc

from worker_service.servicer import read_ahead


def test_the_next_plan_is_read_before_the_step_asks_for_it() -> None:
    pulled = [threading.Event() for _ in range(3)]

    def requests():
        for i, event in enumerate(pulled):
            event.set()
            yield i

    plans = read_ahead(requests())
    assert plans.get(timeout=5) == 0
    # Nothing asks for plan 1 here (the step is "running"): it is read anyway.
    assert pulled[1].wait(timeout=5)
    assert [plans.get(timeout=5) for _ in range(3)] == [1, 2, None]


class _Cancelled(grpc.RpcError):
    pass


def test_a_failed_stream_ends_the_plans() -> None:
    def requests():
        yield "plan"
        raise _Cancelled()

    plans = read_ahead(requests())
    assert plans.get(timeout=5) == "plan"
    assert plans.get(timeout=5) is None
