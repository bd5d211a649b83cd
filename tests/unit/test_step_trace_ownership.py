"""The step trace is owned by whoever builds it: hooks come with ``start`` and go with ``close``,
and an engine rebuilt on reconnect writes the one trace it was given instead of opening another."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protos.step_plan import StepPlan, StepResult, WorkerInfo
from protos.step_trace import StepTrace, open_trace
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine import EngineConfig, EngineCore
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.worker_client import StepTiming, WorkerUnavailable

ROOT = Path(__file__).resolve().parents[2]
INFO = WorkerInfo("m", "m", 100, 64, (0,), 16, 8, "float32", "torch", "cpu")


class FlakyWorker:
    """A RemoteWorker that serves no step and whose first ``num_losses`` pings find it lost."""

    def __init__(self, num_losses: int) -> None:
        self.timing = StepTiming()
        self.num_losses = num_losses
        self.num_sessions = 0
        self.sessions_started = threading.Event()

    def describe(self) -> WorkerInfo:
        return INFO

    def start_session(self) -> None:
        self.num_sessions += 1
        if self.num_sessions > self.num_losses:
            self.sessions_started.set()

    def submit(self, plan: StepPlan) -> None:
        raise AssertionError("no request was sent")

    def receive(self) -> StepResult:
        raise AssertionError("no request was sent")

    def ping(self) -> None:
        if self.num_sessions <= self.num_losses:
            raise WorkerUnavailable("lost (test)")

    def reconnect(self) -> None:
        pass


def test_starting_and_closing_a_trace_leaves_gc_callbacks_as_they_were(tmp_path) -> None:
    callbacks = list(gc.callbacks)
    trace = StepTrace(str(tmp_path / "steps.jsonl")).start()
    trace.start()  # a second start registers nothing more
    assert len(gc.callbacks) == len(callbacks) + 1
    trace.close()
    trace.close()
    assert gc.callbacks == callbacks


@pytest.mark.parametrize("close", [False, True])
def test_a_started_trace_is_flushed_at_exit_until_it_is_closed(tmp_path, close: bool) -> None:
    path = tmp_path / "steps.jsonl"
    script = (
        "from protos.step_trace import StepTrace\n"
        f"trace = StepTrace({str(path)!r}).start()\n"
        + ("trace.close()\n" if close else "")
        + "trace.add(1.0)\n"  # buffered: only an exit hook writes it
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    assert path.exists() is not close


def test_open_trace_closes_its_trace_and_is_off_without_a_path(tmp_path) -> None:
    callbacks = list(gc.callbacks)
    with open_trace(None) as off:
        assert off is None and gc.callbacks == callbacks
    with open_trace(str(tmp_path / "steps.jsonl")) as trace:
        assert trace is not None and len(gc.callbacks) == len(callbacks) + 1
        trace.add(1.0)
    assert gc.callbacks == callbacks
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 1  # flushed on close


def test_engines_built_on_one_trace_share_it_and_add_no_hooks(tmp_path) -> None:
    with StepTrace(str(tmp_path / "steps.jsonl")) as trace:
        callbacks = list(gc.callbacks)
        engines = [EngineCore(EngineConfig(), FlakyWorker(0), None, trace) for _ in range(2)]
        assert all(engine.trace is trace for engine in engines)
        assert gc.callbacks == callbacks


class NoEvents:
    """EngineEvents that go nowhere."""

    def session(self, *args) -> None:
        pass

    lost = refused = update = session


def test_an_engine_rebuilt_on_reconnect_reuses_the_loops_trace(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("scheduler_service.engine_loop.warm_up", lambda engine: None)
    config = SchedulerServiceConfig(
        model_dir="m", worker_addrs=("a:1",), ping_interval_s=0.01, reconnect_interval_s=0.01
    )
    worker = FlakyWorker(num_losses=2)
    with StepTrace(str(tmp_path / "steps.jsonl")) as trace:
        callbacks = list(gc.callbacks)
        engine_loop = EngineLoop(config, worker, None, NoEvents(), trace=trace)  # type: ignore[arg-type]
        engine_loop.start()
        try:
            assert worker.sessions_started.wait(10), "the loop did not reconnect twice"
            deadline = time.monotonic() + 10
            while engine_loop._engine is None and time.monotonic() < deadline:
                time.sleep(0.01)
            engine = engine_loop._engine
        finally:
            engine_loop.stop()
        assert worker.num_sessions == 3  # the first session and two rebuilt after losses
        assert engine is not None and engine.trace is trace
        assert gc.callbacks == callbacks
