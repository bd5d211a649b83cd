"""The headline plot from ``bench.throughput --out RESULTS.json``: each path's tok/s against the
bound, and the streaming clients' TTFT and inter-token latency distributions.

    python -m bench.plot RESULTS.json docs/throughput.png

Needs matplotlib (requirements-dev.txt); the benchmark itself does not, so it runs where only
the GPU image's packages are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, ttft, itl) = plt.subplots(1, 3, figsize=(15, 4.5))
    labels, rates = [], []
    for name, res in results["engines"].items():
        for p in res.get("passes") or [{"pass": 0, "tok_s": res["tokens_per_s"]}]:
            labels.append(name if not p["pass"] else f"{name}\npass {p['pass']}")
            rates.append(p["tok_s"])
            for axis, key in ((ttft, "ttft_ms"), (itl, "itl_ms")):
                values = p.get(key) or []
                if values and name == "grpc-stream":
                    fractions = [i / (len(values) - 1) for i in range(len(values))]
                    axis.plot(values, fractions, label=f"pass {p['pass']}")
    bars.bar(range(len(rates)), rates, color="tab:blue")
    bars.axhline(results["bound_tokens_per_s"], color="tab:red", linestyle="--", label="bound")
    bars.set_xticks(range(len(rates)), labels, fontsize=8)
    bars.set_ylabel("output tokens / s")
    bars.legend()
    bars.set_title(f"{results['workload']} on {results['device']}")
    for axis, title in ((ttft, "time to first token"), (itl, "inter-token latency")):
        axis.set_xscale("log")
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests" if axis is ttft else "fraction of tokens")
        axis.set_title(f"grpc-stream: {title}")
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results")
    p.add_argument("out")
    args = p.parse_args()
    plot(json.loads(Path(args.results).read_text()), Path(args.out))


if __name__ == "__main__":
    main()
