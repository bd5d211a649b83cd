"""The decode GEMMs (bf16, cuBLAS and the engine's own) against the copy bandwidth.

A decode step of M sequences multiplies [M, K] activations by every weight [N, K] once: at small
M the weights' bytes dominate, so the figure is the weight bytes read per second, next to a
device-to-device copy on the same GPU (bytes read + written per second), for ``F.linear``
(cuBLAS) and for the engine's ``models.layers.linear.linear`` (kernels/skinny_gemm.py where it
takes over). Shapes are each
architecture's fused QKV, o_proj, fused gate_up, down_proj and LM head; each is timed inside a
CUDA graph (as the decode graphs replay it), cycling through enough copies of the weight that
they do not fit in L2 (a model's layers each read their own weights: a benchmark that reads one
copy again and again measures L2, not HBM). ``--skinny`` also times kernels/skinny_gemm.py at the
M <= 16 rows over a grid of launch shapes and prints the fastest per shape.

    python -m bench.gemm_bench [--arch qwen3-0.6b,qwen3-8b] [--m 1,16,64,256] [--skinny] [--out FILE]

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
from models.layers.linear import linear


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


COLD_BYTES = 512 * 2**20  # weights cycled through per timing: ten times the H200's L2


def weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(1, -(-COLD_BYTES // (2 * n * k)))
    return [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]


def time_us(fn, x: torch.Tensor, ws: list[torch.Tensor]) -> float:
    """Microseconds per call of ``fn(x, w)``, cycling through ``ws`` inside one CUDA graph."""

    def run() -> None:
        for w in ws:
            fn(x, w)

    fn(x, ws[0])  # compile / allocate outside the graph
    return 1e3 * triton.testing.do_bench_cudagraph(run, rep=100) / len(ws)


def weight_tb_s(n: int, k: int, us: float) -> float:
    """TB/s of an N x K bf16 weight read in ``us`` microseconds."""
    return 2 * n * k / (us * 1e-6) / 1e12


def skinny_grid() -> list:
    from kernels.skinny_gemm import SkinnyGemmConfig

    return [
        SkinnyGemmConfig(block_n, block_k, split_k, 4, 4)
        for block_n in (16, 32, 64)
        for block_k in (256, 512)
        for split_k in (1, 2, 4)
        if block_n * block_k <= 16384
    ]


def best_skinny(m: int, n: int, k: int, ws: list[torch.Tensor]) -> tuple[float, object]:
    from kernels.skinny_gemm import skinny_gemm

    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = F.linear(x, ws[0]).float()
    best = (float("inf"), None)
    for config in skinny_grid():

        def fn(x, w, config=config):
            return skinny_gemm(x, w, config)

        got = fn(x, ws[0]).float()
        assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (config, (got - ref).abs().max())
        us = time_us(fn, x, ws)
        best = min(best, (us, config), key=lambda b: b[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--m", default="1,16,64,256", help="batch sizes (rows of activations)")
    parser.add_argument("--skinny", action="store_true", help="also the Triton skinny GEMM")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    ms = [int(m) for m in args.m.split(",")]
    copy_tbs = copy_bandwidth() / 1e12
    print(f"{torch.cuda.get_device_name()}: copy {copy_tbs:.2f} TB/s (read + write)")
    rows = []
    for arch in args.arch.split(","):
        print(f"\n{arch}: weight TB/s, cuBLAS / the engine's linear (its share of copy), by M")
        print(f"{'gemm':10s}{'N x K':>16s}" + "".join(f"{'M=' + str(m):>22s}" for m in ms))
        for name, (n, k) in shapes(ARCHITECTURES[arch]).items():
            ws = weights(n, k)
            cells = []
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                us = time_us(F.linear, x, ws)
                tbs = weight_tb_s(n, k, us)
                e_us = time_us(lambda x, w: linear(x, w, None), x, ws)  # what the layers run
                e_tbs = weight_tb_s(n, k, e_us)
                row = {"arch": arch, "gemm": name, "n": n, "k": k, "m": m, "us": us, "tb_s": tbs}
                row |= {"engine_us": e_us, "engine_tb_s": e_tbs}
                cell = f"{tbs:5.2f} / {e_tbs:5.2f} ({e_tbs / copy_tbs:4.0%})"
                if args.skinny and m <= 16:
                    s_us, config = best_skinny(m, n, k, ws)
                    s_tbs = weight_tb_s(n, k, s_us)
                    row |= {"skinny_us": s_us, "skinny_tb_s": s_tbs, "skinny": repr(config)}
                    cell += f" skinny {s_tbs:5.2f} {config}"
                rows.append(row)
                cells.append(cell)
            print(f"{name:10s}{f'{n} x {k}':>16s}" + "".join(f"{c:>22s}" for c in cells))
            del ws
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tbs, "rows": rows}, f
            )


if __name__ == "__main__":
    main()
