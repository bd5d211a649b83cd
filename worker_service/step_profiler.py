"""Profile a window of steps on the device and write where the device time went (benchmarks only).

``python -m worker_service ... --profile-steps START,COUNT --profile-out PATH`` wraps the worker so
that steps START .. START+COUNT-1 (counted from process start) run under ``torch.profiler`` with
CUDA activity only; the kernel times, split into collectives (NCCL/gloo kernels) and the rest, go to
PATH as JSON. A step's GPU work may finish inside the next step's call (async scheduling), so the
window covers whole steps only approximately. Not for production: the profiler slows those steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scheduler_service.step_plan import StepPlan, StepResult, WorkerInfo
from worker_service.worker import Worker

COLLECTIVE_MARKERS = ("nccl", "gloo", "allreduce", "all_reduce")


class ProfiledWorker:
    """A ``Worker`` whose steps in [start, start + count) run under torch.profiler."""

    def __init__(self, worker: Worker, start: int, count: int, out: str) -> None:
        self.worker, self.start, self.count, self.out = worker, start, count, Path(out)
        self.num_steps = 0
        self._profile = None
        self._window_start = 0.0

    def describe(self) -> WorkerInfo:
        return self.worker.describe()

    def start_session(self) -> None:
        self.worker.start_session()

    def step(self, plan: StepPlan) -> StepResult:
        if self.num_steps == self.start:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CUDA])
            self._profile.__enter__()
            self._window_start = time.perf_counter()
        result = self.worker.step(plan)
        self.num_steps += 1
        if self._profile is not None and self.num_steps == self.start + self.count:
            self._finish()
        return result

    def _finish(self) -> None:
        import torch

        torch.cuda.synchronize()
        wall_s = time.perf_counter() - self._window_start
        self._profile.__exit__(None, None, None)
        kernels = {e.key: e.self_device_time_total for e in self._profile.key_averages()}
        self._profile = None
        total_us = sum(kernels.values())
        collective_us = sum(
            t for name, t in kernels.items() if any(m in name.lower() for m in COLLECTIVE_MARKERS)
        )
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
        summary = {
            "steps": [self.start, self.start + self.count],
            "wall_s": wall_s,
            "device_time_us": total_us,
            "collective_time_us": collective_us,
            "collective_share": collective_us / total_us if total_us else 0.0,
            "top_kernels_us": dict(top),
        }
        self.out.write_text(json.dumps(summary, indent=2))
