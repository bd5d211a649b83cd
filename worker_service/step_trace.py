"""Per-step device timing for benchmarks: ``NANOSERVE_STEP_TRACE=PATH`` turns it on.

Each collected step appends one JSON line to PATH: the wall-clock time it was collected, its
sequences, tokens and context tokens (the K/V rows its attention reads), the device time it took
and how long the device sat idle before it started (the host was late). ``bench/step_report.py``
turns a trace into where the time went by batch size. Off (no cost) unless the variable is set.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path


class StepTrace:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lines: list[str] = []
        atexit.register(self.flush)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get("NANOSERVE_STEP_TRACE")
        return cls(path) if path else None

    def add(
        self, num_seqs: int, num_tokens: int, context_tokens: int, busy_ms: float, idle_ms: float
    ) -> None:
        record = [time.time(), num_seqs, num_tokens, context_tokens, busy_ms, idle_ms]
        self._lines.append(json.dumps(record))
        if len(self._lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            with self.path.open("a") as f:
                f.write("\n".join(self._lines) + "\n")
            self._lines.clear()
