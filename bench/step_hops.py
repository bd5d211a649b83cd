"""Where a step's plan and answer spent their time between the two services, from the ``.hops``
files of a step trace (protos/step_trace.py; every process stamps them with the same wall clock).

Between a step's answer leaving the worker and the next plan reaching the worker's step handler,
the device runs the step already launched (one step ahead): when that way takes longer than the
step, the device waits. It is cut into legs, each a hand-off from one thread to the next:

- answer: the worker's handler gave gRPC the answer -> the scheduler's engine thread had it;
- turn: the engine thread had the answer -> it queued the next plan (outputs, scheduling);
- queue: queued -> gRPC's request thread took it (the scheduler process);
- wire: taken -> the worker's reader thread read it (both gRPC cores, the loopback);
- handler: read (or, if later, the handler gave gRPC its previous answer) -> the step handler
  took it (the worker process).

Then each answer's way on to the client, from the engine thread having it:

- outputs: -> the engine thread sent the step's outputs to the front end (stop checks, text);
- pipe: -> the front end's reader thread had them;
- loop: -> its event loop took them up;
- stream: -> the client had the chunk (the request streams, gRPC, the client), with ``--client
  PATH`` (bench.single_stream writes one, ``[time, tokens]`` per streamed chunk), each chunk
  matched to the latest outputs taken up before it.

    python -m bench.step_hops TRACE [--slow-ms 1]   (also printed by bench.step_report)
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path

from protos.step_trace import FRONT_SUFFIX, HOPS_SUFFIX, SCHEDULER_SUFFIX

CLIENT_SUFFIX = ".client"  # bench.single_stream's chunk arrivals, beside the trace
LEGS = ("answer", "turn", "queue", "wire", "handler")
CLIENT_LEGS = ("outputs", "pipe", "loop", "stream")


def read_hops(trace: str | Path) -> dict[int, dict[str, float]]:
    """step id -> {hop: time}, from the worker's, the engine process's and the front end's files
    (ids below 0, the first deferred answer's and empty plans', are left out)."""
    steps: dict[int, dict[str, float]] = {}
    for suffix in ("", SCHEDULER_SUFFIX, FRONT_SUFFIX):
        path = Path(f"{trace}{suffix}{HOPS_SUFFIX}")
        if path.exists():
            for line in path.read_text().splitlines():
                step_id, hop, at = json.loads(line)
                if step_id >= 0:
                    steps.setdefault(step_id, {})[hop] = at
    return steps


def read_arrivals(path: str | Path) -> list[list[float]] | None:
    """A client's chunk arrivals, ``[time, tokens]`` a line; None without the file."""
    path = Path(path)
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines()]


def cycles(steps: dict[int, dict[str, float]]) -> list[dict[str, float]]:
    """For each answer, the legs (ms) of its way and of the first plan queued after it; the
    handler's leg counts from when the plan was read or, if later, when the handler gave gRPC
    its previous answer (time it was busy is not the way's). ``at``: when the answer left the
    worker; ``total``: the legs' sum."""
    plans = sorted((h["sent"], i) for i, h in steps.items() if {"sent", "handled"} <= h.keys())
    replies = sorted(h["replied"] for h in steps.values() if "replied" in h)
    out = []
    for h in steps.values():
        if not {"replied", "answered"} <= h.keys():
            continue
        k = bisect.bisect_left(plans, (h["answered"], -1))
        if k == len(plans) or not {"taken", "read"} <= steps[plans[k][1]].keys():
            continue
        p = steps[plans[k][1]]
        free = replies[bisect.bisect_left(replies, p["handled"]) - 1]  # the handler's last reply
        times = [h["replied"], h["answered"], p["sent"], p["taken"], p["read"]]
        legs = {leg: 1e3 * (b - a) for leg, a, b in zip(LEGS, times, times[1:])}
        legs["handler"] = 1e3 * (p["handled"] - max(p["read"], free))
        out.append({"at": h["replied"], **legs, "total": sum(legs.values())})
    return sorted(out, key=lambda c: c["at"])


def front_legs(steps: dict[int, dict[str, float]]) -> list[dict[str, float]]:
    """For each answer whose outputs reached the front end's loop, their legs (ms) up to there."""
    hops = ("answered", "published", "received", "dispatched")
    out = []
    for h in steps.values():
        if set(hops) <= h.keys():
            times = [h[hop] for hop in hops]
            out.append({leg: 1e3 * (b - a) for leg, a, b in zip(CLIENT_LEGS, times, times[1:])})
    return out


def stream_lags(steps: dict[int, dict[str, float]], client: list[list[float]]) -> list[float]:
    """Each streamed chunk's ms behind the latest outputs the front end's loop took up before it."""
    taken_up = sorted(h["dispatched"] for h in steps.values() if "dispatched" in h)
    lags = []
    for at, _tokens in client:
        k = bisect.bisect_right(taken_up, at)
        if k:
            lags.append(1e3 * (at - taken_up[k - 1]))
    return lags


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    n = len(ordered)
    p50, p99 = ordered[n // 2], ordered[int(0.99 * (n - 1))]
    return f"{p50:>9.3f}{p99:>9.3f}{ordered[-1]:>9.3f}"


def print_hops(steps: dict[int, dict[str, float]], slow_ms: float, client=None) -> None:
    """Each leg's p50 / p99 / max, then every way longer than ``slow_ms`` leg by leg."""
    found = cycles(steps)
    if not found:
        return
    print(f"{'between steps, ms':<22}{'p50':>9}{'p99':>9}{'max':>9}")
    for leg in (*LEGS, "total"):
        print(f"{leg:<22}" + _quantiles([c[leg] for c in found]))
    front = front_legs(steps)
    lags = stream_lags(steps, client or [])
    columns = [[w[leg] for w in front] for leg in CLIENT_LEGS[:-1]] + [lags]
    for leg, values in zip(CLIENT_LEGS, columns):
        if values:
            print(f"{'client: ' + leg:<22}" + _quantiles(values))
    slow = [c for c in found if c["total"] > slow_ms]
    if slow:
        print(f"ways over {slow_ms:g} ms (s into the trace, then ms: " + " ".join(LEGS) + ")")
    for c in slow:
        legs = " ".join(f"{leg}={c[leg]:.2f}" for leg in LEGS)
        print(f"{c['at'] - found[0]['at']:9.3f} s total {c['total']:6.2f} | {legs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--slow-ms", type=float, default=1.0, help="list the ways longer")
    parser.add_argument("--client", help="a client's chunk arrivals, [time, tokens] per line")
    args = parser.parse_args()
    client = read_arrivals(args.client) if args.client else None
    print_hops(read_hops(args.trace), args.slow_ms, client)


if __name__ == "__main__":
    main()
