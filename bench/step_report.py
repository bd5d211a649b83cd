"""Where a benchmark's time went, by step kind and batch size, from a step trace.

The worker writes the trace when ``NANOSERVE_STEP_TRACE=PATH`` is set (protos/step_trace.py):
one line per step with its sequences, tokens, context tokens, device-busy and device-idle time and
the worker's host phases; the scheduler writes ``PATH.scheduler`` with its engine thread's phases.
Each decode step's bound is its weight bytes plus the K/V bytes of its context at the copy
bandwidth; "idle" is time the device waited for the host between steps. Host phases are printed as
milliseconds per step (means), so a phase that outlasts the device step is easy to spot. Then each
step the device waited more than ``--stall-ms`` for (default 1 ms), one per line: its worker
phases and the phases of the scheduler lines written since the worker's previous step (both
processes stamp lines with the same wall clock), so a stall shows which process was late, and in
which phase. Over gRPC, last, the way between steps thread by thread (bench.step_hops; with a
client's arrivals at TRACE.client, as bench.single_stream writes them, the client's lag too).

    python -m bench.step_report TRACE --arch qwen3-0.6b --bandwidth-gbps 4200 [--stall-ms 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from bench.bound import kv_bytes_per_token, weight_bytes
from bench.step_hops import CLIENT_SUFFIX, print_hops, read_arrivals, read_hops
from protos.step_trace import SCHEDULER_PHASES, WORKER_PHASES

BANDS = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 100_000)]


def read_trace(path: str | Path, since: float = 0.0) -> list[list]:
    path = Path(path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in rows if r[0] >= since]


def _band(num_seqs: int) -> str:
    lo, hi = next(b for b in BANDS if b[0] <= num_seqs <= b[1])
    return f"{lo}-{hi if hi < 100_000 else 'max'}"


def _is_prefill(row: list) -> bool:
    """A prefill, chunked or mixed step: more tokens than sequences."""
    return row[2] > row[1]


def _host(row: list) -> dict[str, float]:
    return row[-1] if isinstance(row[-1], dict) else {}


def summarize(rows: list[list], cfg: dict, bandwidth: float) -> list[dict]:
    """Worker rows: [time, seqs, tokens, context tokens, busy ms, idle ms, {phase: ms}]."""
    weights, per_token = weight_bytes(cfg), kv_bytes_per_token(cfg)
    groups: dict[str, dict] = {}
    for row in rows:
        _, seqs, _, context, busy_ms, idle_ms = row[:6]
        name = "prefill/mixed" if _is_prefill(row) else f"decode {_band(seqs)}"
        g = groups.setdefault(
            name,
            {
                "group": name,
                "steps": 0,
                "busy_s": 0.0,
                "idle_s": 0.0,
                "bound_s": 0.0,
                "host_ms": {},
            },
        )
        g["steps"] += 1
        g["busy_s"] += busy_ms / 1e3
        g["idle_s"] += idle_ms / 1e3
        g["bound_s"] += (weights + context * per_token) / bandwidth
        _add_host(g, _host(row))
    return sorted(groups.values(), key=lambda g: g["group"])


def summarize_scheduler(rows: list[list]) -> list[dict]:
    """Scheduler rows: [time, outputs, {phase: ms}], grouped by outputs (the batch size)."""
    groups: dict[str, dict] = {}
    for row in rows:
        name = f"outputs {_band(max(1, row[1]))}"
        g = groups.setdefault(name, {"group": name, "steps": 0, "host_ms": {}})
        g["steps"] += 1
        _add_host(g, _host(row))
    return sorted(groups.values(), key=lambda g: g["group"])


def _add_host(group: dict, host: dict[str, float]) -> None:
    for phase, ms in host.items():
        group["host_ms"][phase] = group["host_ms"].get(phase, 0.0) + ms


def print_summary(groups: list[dict]) -> None:
    print(f"{'steps':<16}{'count':>7}{'busy s':>9}{'idle s':>9}{'bound s':>9}{'busy/bound':>12}")
    for g in groups:
        ratio = g["busy_s"] / g["bound_s"] if g["bound_s"] else float("nan")
        print(
            f"{g['group']:<16}{g['steps']:>7}{g['busy_s']:>9.3f}{g['idle_s']:>9.3f}"
            f"{g['bound_s']:>9.3f}{ratio:>12.2f}"
        )
    total = {k: sum(g[k] for g in groups) for k in ("steps", "busy_s", "idle_s", "bound_s")}
    print(
        f"{'total':<16}{total['steps']:>7}{total['busy_s']:>9.3f}{total['idle_s']:>9.3f}"
        f"{total['bound_s']:>9.3f}{total['busy_s'] / max(total['bound_s'], 1e-9):>12.2f}"
    )
    print_host(groups, WORKER_PHASES, "worker host ms / step", device=True)


def print_prefill_steps(rows: list[list]) -> None:
    """Each prefill, chunked or mixed step on its own line (a pass has a few dozen): which of
    them took the device time, to compare two runs step by step."""
    steps = [row for row in rows if _is_prefill(row)]
    if not steps:
        return
    phases = [p for p in WORKER_PHASES if any(p in _host(row) for row in steps)]
    head = "".join(f"{c:>9}" for c in ("seqs", "tokens", "context", "busy ms", "idle ms"))
    print(f"{'prefill step':<14}" + head + "".join(f"{p:>9}" for p in phases))
    for i, row in enumerate(steps):
        _, seqs, tokens, context, busy_ms, idle_ms = row[:6]
        host = _host(row)
        print(
            f"{i:<14}{seqs:>9}{tokens:>9}{context:>9}{busy_ms:>9.2f}{idle_ms:>9.2f}"
            + "".join(f"{host.get(p, 0.0):>9.2f}" for p in phases)
        )


def stalled_steps(rows: list[list], scheduler_rows: list[list], stall_ms: float) -> list[dict]:
    """The worker steps whose device idled more than ``stall_ms`` before them, each with the
    scheduler lines stamped after the worker's previous line and up to its own."""
    stalls = []
    for prev, row in itertools.pairwise(rows):
        if row[5] <= stall_ms:
            continue
        near = [s for s in scheduler_rows if prev[0] < s[0] <= row[0]]
        stalls.append(
            {
                "time": row[0],
                "seqs": row[1],
                "idle_ms": row[5],
                "worker": _host(row),
                "scheduler": [_host(s) for s in near],
            }
        )
    return stalls


def print_stalls(stalls: list[dict], stall_ms: float, t0: float) -> None:
    """One line per stalled step: seconds into the trace, sequences, idle ms, and the phases
    (worker, then each scheduler line) that took over 0.05 ms."""
    if not stalls:
        return
    print(f"steps the device waited over {stall_ms:g} ms for (phase ms, worker | scheduler):")

    def phases(host: dict[str, float]) -> str:
        return " ".join(f"{p}={ms:.2f}" for p, ms in host.items() if ms > 0.05) or "-"

    for s in stalls:
        scheduler = " ; ".join(phases(h) for h in s["scheduler"]) or "no line"
        print(
            f"{s['time'] - t0:9.3f} s {s['seqs']:>5} seqs idle {s['idle_ms']:6.2f} ms | "
            f"{phases(s['worker'])} | {scheduler}"
        )


def print_host(groups: list[dict], phases: tuple[str, ...], title: str, device=False) -> None:
    """Mean milliseconds per step of each host phase (and of the device's busy time)."""
    present = [p for p in phases if any(p in g["host_ms"] for g in groups)]
    if not present:
        return
    cols = (["device"] if device else []) + present
    print(f"{title:<22}" + "".join(f"{c:>10}" for c in cols))
    for g in groups:
        n = max(1, g["steps"])
        values = ([g["busy_s"] * 1e3 / n] if device else []) + [
            g["host_ms"].get(p, 0.0) / n for p in present
        ]
        print(f"{g['group']:<22}" + "".join(f"{v:>10.3f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--model", help="checkpoint dir (its config.json)")
    parser.add_argument("--arch", default="qwen3-0.6b")
    parser.add_argument("--bandwidth-gbps", type=float, required=True)
    parser.add_argument("--stall-ms", type=float, default=1.0, help="list steps idled before")
    args = parser.parse_args()
    if args.model:
        cfg = json.loads((Path(args.model) / "config.json").read_text())
    else:
        from bench.checkpoint import ARCHITECTURES

        cfg = ARCHITECTURES[args.arch]
    rows = read_trace(args.trace)
    print_summary(summarize(rows, cfg, args.bandwidth_gbps * 1e9))
    print_prefill_steps(rows)
    scheduler_rows = read_trace(args.trace + ".scheduler")
    print_host(summarize_scheduler(scheduler_rows), SCHEDULER_PHASES, "scheduler host ms")
    if rows:
        stalls = stalled_steps(rows, scheduler_rows, args.stall_ms)
        print_stalls(stalls, args.stall_ms, rows[0][0])
    arrivals = read_arrivals(args.trace + CLIENT_SUFFIX)
    print_hops(read_hops(args.trace), args.stall_ms, arrivals)


if __name__ == "__main__":
    main()
