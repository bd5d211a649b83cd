"""Where a benchmark's device time went, by step kind and batch size, from a step trace.

The worker writes the trace when ``NANOSERVE_STEP_TRACE=PATH`` is set (worker_service/step_trace.py):
one line per step with its sequences, tokens, context tokens, device-busy and device-idle time.
Each decode step's bound is its weight bytes plus the K/V bytes of its context at the copy
bandwidth; "idle" is time the device waited for the host between steps.

    python -m bench.step_report TRACE --arch qwen3-0.6b --bandwidth-gbps 4200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.bound import kv_bytes_per_token, weight_bytes

BANDS = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 100_000)]


def read_trace(path: str | Path, since: float = 0.0) -> list[list[float]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [r for r in rows if r[0] >= since]


def summarize(rows: list[list[float]], cfg: dict, bandwidth: float) -> list[dict]:
    """Rows: [time, seqs, tokens, context tokens, busy ms, idle ms]; one dict per group."""
    weights, per_token = weight_bytes(cfg), kv_bytes_per_token(cfg)
    groups: dict[str, dict] = {}
    for _, seqs, tokens, context, busy_ms, idle_ms in rows:
        if tokens > seqs:
            name = "prefill/mixed"
        else:
            lo, hi = next(b for b in BANDS if b[0] <= seqs <= b[1])
            name = f"decode {lo}-{hi if hi < 100_000 else 'max'}"
        g = groups.setdefault(
            name, {"group": name, "steps": 0, "busy_s": 0.0, "idle_s": 0.0, "bound_s": 0.0}
        )
        g["steps"] += 1
        g["busy_s"] += busy_ms / 1e3
        g["idle_s"] += idle_ms / 1e3
        g["bound_s"] += (weights + context * per_token) / bandwidth
    return sorted(groups.values(), key=lambda g: g["group"])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--model", help="checkpoint dir (its config.json)")
    parser.add_argument("--arch", default="qwen3-0.6b")
    parser.add_argument("--bandwidth-gbps", type=float, required=True)
    args = parser.parse_args()
    if args.model:
        cfg = json.loads((Path(args.model) / "config.json").read_text())
    else:
        from bench.checkpoint import ARCHITECTURES

        cfg = ARCHITECTURES[args.arch]
    print_summary(summarize(read_trace(args.trace), cfg, args.bandwidth_gbps * 1e9))


if __name__ == "__main__":
    main()
