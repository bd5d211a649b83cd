"""The decode GEMMs as the model runs them (``F.linear``, bf16), against the copy bandwidth.

A decode step of M sequences multiplies [M, K] activations by every weight [N, K] once: at small
M the weights' bytes dominate, so the figure is the weight bytes read per second, next to a
device-to-device copy on the same GPU (bytes read + written per second). Shapes are each
architecture's fused QKV, o_proj, fused gate_up, down_proj and LM head; each is timed inside a
CUDA graph (as the decode graphs replay it).

    python -m bench.gemm_bench [--arch qwen3-0.6b,qwen3-8b] [--m 1,16,64,256] [--out FILE]

Needs CUDA. Not a test; the shapes' table goes to docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from bench.checkpoint import ARCHITECTURES
from bench.kernel_bench import copy_bandwidth


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of one layer's GEMMs and the LM head."""
    h, d, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {
        "qkv": (q + 2 * kv, h),
        "o_proj": (h, q),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (cfg["vocab_size"], h),
    }


def time_linear_us(m: int, n: int, k: int) -> float:
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    return 1e3 * triton.testing.do_bench_cudagraph(lambda: F.linear(x, w), rep=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--m", default="1,16,64,256", help="batch sizes (rows of activations)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    ms = [int(m) for m in args.m.split(",")]
    copy_tbs = copy_bandwidth() / 1e12
    print(f"{torch.cuda.get_device_name()}: copy {copy_tbs:.2f} TB/s (read + write)")
    rows = []
    for arch in args.arch.split(","):
        print(f"\n{arch}: weight TB/s (share of copy) by M")
        print(f"{'gemm':10s}{'N x K':>16s}" + "".join(f"{'M=' + str(m):>18s}" for m in ms))
        for name, (n, k) in shapes(ARCHITECTURES[arch]).items():
            cells = []
            for m in ms:
                us = time_linear_us(m, n, k)
                tbs = 2 * n * k / (us * 1e-6) / 1e12
                rows.append(
                    {"arch": arch, "gemm": name, "n": n, "k": k, "m": m, "us": us, "tb_s": tbs}
                )
                cells.append(f"{tbs:7.2f} ({tbs / copy_tbs:4.0%})")
            print(f"{name:10s}{f'{n} x {k}':>16s}" + "".join(f"{c:>18s}" for c in cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tbs, "rows": rows}, f
            )


if __name__ == "__main__":
    main()
