"""Per-step timing for benchmarks: ``--step-trace PATH`` (or ``NANOSERVE_STEP_TRACE=PATH``).

Two writers, one JSON line per step each:
- the worker (rank 0) appends to PATH: the wall-clock time it collected the step, its sequences,
  tokens and context tokens (the K/V rows its attention reads), the device time it took, how long
  the device sat idle before it started (the host was late), and where the worker's host time went
  (``WORKER_PHASES``, milliseconds);
- the scheduler service appends to ``PATH.scheduler``: the time, the outputs the step returned and
  where the engine thread's time went (``SCHEDULER_PHASES``);
- over gRPC, each process also appends to its path + ``.hops`` when a step's plan or answer
  passed each thread on its way (``HOPS``): ``[step_id, hop, time]``; the scheduler's front end
  writes only those, to ``PATH.front.hops``.
``bench/step_report.py`` turns them into where the time went by batch size.

Ownership: a process's ``main()`` (or the offline ``LLM``) builds one trace, ``start``s it (a
garbage-collection callback and a flush at exit) and ``close``s it, which removes both; the
objects that write it get it as an argument, ``StepTrace | None`` (None: off, no cost). Nothing
here reads the environment. Only this module's name is shared: it imports nothing from either side.
"""

from __future__ import annotations

import atexit
import gc
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

# The worker, per step call: plan_wait = blocked for the next plan (gRPC), decode / encode = the
# plan's protobuf in and the reply's out, gap = since the previous step call returned (in-process:
# the scheduler's own work), prep = sequence table, inputs and launching the forward and sampler,
# wait = blocked on the device for the previous step's tokens, collect = the rest of collecting.
# gc = the process's garbage collections (inside the other phases, in whichever thread).
WORKER_PHASES = ("plan_wait", "decode", "gap", "prep", "wait", "collect", "encode", "gc")
# The scheduler's engine thread, per step that got an answer: plan = schedule + build + send,
# receive = blocked on the worker's answer, outputs = stop checks and request outputs, loop = the
# rest of the engine loop since the previous step (handing outputs over, stats, new requests).
SCHEDULER_PHASES = ("plan", "receive", "outputs", "loop", "gc")
SCHEDULER_SUFFIX = ".scheduler"  # the scheduler's lines go beside the worker's
# A plan's way and its answer's, in order (the wall clock, every process): the engine thread
# queued it (sent), gRPC's request thread took it (taken), the worker's reader thread got it
# (read), its step handler took it (handled); the handler gave gRPC the answer (replied), the
# engine thread had it (answered) and sent its outputs to the front end (published), whose
# reader thread had them (received) and whose event loop took them up (dispatched). The answer
# and its outputs name the step whose tokens they carry.
HOPS = (
    "sent",
    "taken",
    "read",
    "handled",
    "replied",
    "answered",
    "published",
    "received",
    "dispatched",
)
HOPS_SUFFIX = ".hops"
FRONT_SUFFIX = ".front"  # the scheduler's front end: its hops only


class StepTrace:
    """Buffered JSON lines at ``path``. Writing needs no ``start``; noting collections does."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lines: list[str] = []
        self._host: dict[str, float] = {}  # phases noted since the last line
        self._gc_start = 0
        self._hops: list[str] = []  # written by several threads: under the lock
        self._hops_path = self.path.with_name(self.path.name + HOPS_SUFFIX)
        self._hops_lock = threading.Lock()

    def start(self) -> StepTrace:
        """Note garbage collections (a ``gc.callbacks`` entry) and flush at exit, until close()."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
            atexit.register(self.flush)
        return self

    def close(self) -> None:
        """Remove what ``start`` registered and write the buffered lines."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
            atexit.unregister(self.flush)
        self.flush()

    def __enter__(self) -> StepTrace:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter_ns()
        elif self._gc_start:
            self.note("gc", ms_since(self._gc_start))

    def note(self, phase: str, ms: float) -> None:
        """Add host time to ``phase``; it goes out with the next line."""
        self._host[phase] = self._host.get(phase, 0.0) + ms

    def add(self, *values: float) -> None:
        """One line: the time, ``values``, then the host phases noted since the last line."""
        record = [time.time(), *values, {k: round(v, 4) for k, v in self._host.items()}]
        self._host = {}
        self._lines.append(json.dumps(record))
        if len(self._lines) >= 256:
            self.flush()

    def hop(self, step_id: int, hop: str) -> None:
        """Step ``step_id``'s plan or answer passed ``hop`` (one of HOPS) now: a line of the
        ``.hops`` file beside this trace."""
        line = json.dumps([step_id, hop, time.time()])
        with self._hops_lock:
            self._hops.append(line)
            if len(self._hops) < 1024:
                return
            lines, self._hops = self._hops, []
        _append(self._hops_path, lines)

    def flush(self) -> None:
        _append(self.path, self._lines)
        self._lines = []
        with self._hops_lock:
            hops, self._hops = self._hops, []
        _append(self._hops_path, hops)


def _append(path: Path, lines: list[str]) -> None:
    if lines:
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")


@contextmanager
def open_trace(path: str | None) -> Iterator[StepTrace | None]:
    """A started trace at ``path`` for the ``with`` block, closed after it; None when ``path`` is
    empty (tracing off)."""
    if not path:
        yield None
        return
    with StepTrace(path) as trace:
        yield trace


def ms_since(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6
