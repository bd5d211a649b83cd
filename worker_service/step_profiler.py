"""Profile a window of steps on the device and write where the device time went (benchmarks only).

``python -m worker_service ... --profile-steps START,COUNT --profile-out PATH`` wraps the worker so
that steps START .. START+COUNT-1 (counted from process start) run under ``torch.profiler`` with
CUDA activity only; kernel times, with the all-reduce and all collective (NCCL) kernels summed apart,
go to PATH as JSON. NCCL kernel time includes waiting for the slowest rank. A step's GPU work may
finish inside the next step's call (async scheduling), so the window covers whole steps only
approximately. Not for production: the profiler slows those steps.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from protos.sampling_params import Constraint
from protos.step_plan import StepPlan, StepResult, WorkerInfo
from worker_service.servicer import StepExecutor

log = logging.getLogger(__name__)
COLLECTIVE_MARKERS = ("nccl", "gloo", "allreduce", "all_reduce", "broadcast", "gather")


class ProfiledWorker:
    """A worker (a ``StepExecutor``) whose steps in [start, start + count) run under
    torch.profiler; everything else goes straight to the wrapped worker."""

    def __init__(self, worker: StepExecutor, start: int, count: int, out: str) -> None:
        self.worker, self.start, self.count, self.out = worker, start, count, Path(out)
        self.num_steps = 0
        self._profile: profile | None = None  # open during the window
        self._on_cuda = False
        self._window_start = 0.0

    def describe(self) -> WorkerInfo:
        return self.worker.describe()

    def start_session(self) -> None:
        self.worker.start_session()

    def memory_bytes(self) -> int:
        return self.worker.memory_bytes()

    def check_constraint(self, constraint: Constraint) -> str:
        return self.worker.check_constraint(constraint)

    def step(self, plan: StepPlan) -> StepResult:
        if self.num_steps == self.start:
            self._begin()
        result = self.worker.step(plan)
        self.num_steps += 1
        if self._profile is not None and self.num_steps == self.start + self.count:
            window, self._profile = self._profile, None
            try:
                self._finish(window)
            except Exception:  # a broken profile must not take the session down
                log.exception("step profile failed")
        return result

    def _begin(self) -> None:
        self._on_cuda = torch.cuda.is_available()
        activity = ProfilerActivity.CUDA if self._on_cuda else ProfilerActivity.CPU
        self._profile = profile(activities=[activity])
        self._profile.__enter__()
        self._window_start = time.perf_counter()

    def _finish(self, window: profile) -> None:
        if self._on_cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - self._window_start
        window.__exit__(None, None, None)
        events = window.key_averages()
        if self._on_cuda:
            times = {e.key: e.self_device_time_total for e in events}
        else:  # CPU rehearsal: op times on the host
            times = {e.key: e.self_cpu_time_total for e in events}
        total_us = sum(times.values())
        collective_us = _sum_matching(times, COLLECTIVE_MARKERS)
        all_reduce_us = _sum_matching(times, ("allreduce", "all_reduce"))
        top = sorted(times.items(), key=lambda kv: -kv[1])[:25]
        summary = {
            "steps": [self.start, self.start + self.count],
            "timed": "device kernels" if self._on_cuda else "host ops",
            "wall_s": wall_s,
            "total_us": total_us,
            "collective_us": collective_us,
            "all_reduce_us": all_reduce_us,
            "all_reduce_share": all_reduce_us / total_us if total_us else 0.0,
            "collective_share": collective_us / total_us if total_us else 0.0,
            "top_us": dict(top),
        }
        self.out.write_text(json.dumps(summary, indent=2))


def _sum_matching(times: dict[str, float], markers: tuple[str, ...]) -> float:
    return sum(t for name, t in times.items() if any(m in name.lower() for m in markers))
