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
M <= 16 rows over a grid of launch shapes and prints the fastest per shape. ``--sweep M,...``
times Qwen3-0.6B's layer GEMMs at those row counts, cuBLAS against the fastest launch shape of
a larger grid (kernels/skinny_gemm_configs.py keeps the winners); ``--compile i/n`` only compiles
the i-th n-th of that grid (run n of them at once first: the timed sweep then finds every kernel
compiled). ``--l2-hot`` prints cuBLAS's microseconds per call with the weights from HBM (cycled)
beside one copy read again and again (L2-resident): how much of a GEMM's time its weight reads
are.

    python -m bench.gemm_bench [--arch qwen3-0.6b,qwen3-8b] [--m 1,16,64,256] [--skinny]
        [--out FILE] [--sweep 32,64,128,256 [--compile I/N]] [--l2-hot]

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


def time_us(fn, x: torch.Tensor, ws: list[torch.Tensor], rep: int = 100) -> float:
    """Microseconds per call of ``fn(x, w)``, cycling through ``ws`` inside one CUDA graph
    (``rep``: milliseconds of replays to time)."""

    def run() -> None:
        for w in ws:
            fn(x, w)

    fn(x, ws[0])  # compile / allocate outside the graph
    return 1e3 * triton.testing.do_bench_cudagraph(run, rep=rep) / len(ws)


def weight_tb_s(n: int, k: int, us: float) -> float:
    """TB/s of an N x K bf16 weight read in ``us`` microseconds."""
    return 2 * n * k / (us * 1e-6) / 1e12


def skinny_grid(m: int, wide: bool) -> list:
    """Launch shapes to try at M rows: the M <= 16 grid, or for more rows row blocks up to M,
    column blocks, K tiles and (narrow outputs more) K slices."""
    from kernels.skinny_gemm import SkinnyGemmConfig

    if m <= 16:
        return [
            SkinnyGemmConfig(block_n, block_k, split_k, 4, 4)
            for block_n in (16, 32, 64)
            for block_k in (256, 512)
            for split_k in (1, 2, 4)
            if block_n * block_k <= 16384
        ]
    return [
        SkinnyGemmConfig(
            block_n, block_k, split_k, 4 if block_m * block_n <= 4096 else 8, 3, block_m
        )
        for block_m in (16, 32, 64, 128)
        if block_m < 2 * m
        for block_n in (32, 64, 128)
        for block_k in (64, 128)
        for split_k in ((1, 2) if wide else (1, 2, 4, 8))
    ]


def gated_cublas(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the MLP runs without the gated kernel: cuBLAS, then SiLU-and-mul."""
    from models.layers.activation import SiluAndMul

    return SiluAndMul()(F.linear(x, w))


def best_skinny(
    m: int, n: int, k: int, ws: list[torch.Tensor], gated: bool = False, shard=(0, 1), rep=100
) -> tuple[float, object]:
    """The fastest launch shape of the grid (each checked against cuBLAS first); with ``rep`` 0 only
    this shard's share of the grid is checked, which compiles it (bench.gemm_bench --compile)."""
    from kernels.skinny_gemm import skinny_gemm

    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = (gated_cublas if gated else F.linear)(x, ws[0]).float()
    best = (float("inf"), None)
    grid = skinny_grid(m, wide=n >= 4096)
    for config in grid[shard[0] :: shard[1]]:

        def fn(x, w, config=config):
            return skinny_gemm(x, w, config, gated=gated)

        try:
            got = fn(x, ws[0]).float()
        except triton.runtime.errors.OutOfResources:
            continue  # too much shared memory for this GPU
        assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (config, (got - ref).abs().max())
        if rep:
            best = min(best, (time_us(fn, x, ws, rep), config), key=lambda b: b[0])
    return best


def sweep(ms: list[int], shard: tuple[int, int] | None) -> None:
    """Qwen3-0.6B's GEMMs at each M: cuBLAS (gate_up: then SiLU-and-mul) against the best
    skinny_gemm launch shape; ``shard`` (i, n): only compile the i-th n-th of the grid."""
    for name, (n, k) in shapes(ARCHITECTURES["qwen3-0.6b"]).items():
        if name == "lm_head":
            continue
        ws, gated = weights(n, k), name == "gate_up"
        for m in ms:
            if shard is not None:
                best_skinny(m, n, k, ws, gated, shard, rep=0)
                continue
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            base = time_us(gated_cublas if gated else F.linear, x, ws)
            us, config = best_skinny(m, n, k, ws, gated, rep=20)
            print(f"sweep {name:8s} M={m:4d} cublas {base:6.2f} us  skinny {us:6.2f} us  {config}")
        del ws


def table(title: str, arch: str, ms: list[int], width: int, cell) -> None:
    """Print one row per GEMM of ``arch`` and one column per M: ``cell(arch, name, n, k, x, ws)``,
    with ``x`` the [M, K] activations and ``ws`` the weight's copies (cycled: see ``weights``)."""
    print(f"\n{arch}: {title}, by M")
    print(f"{'gemm':10s}{'N x K':>16s}" + "".join(f"{'M=' + str(m):>{width}s}" for m in ms))
    for name, (n, k) in shapes(ARCHITECTURES[arch]).items():
        ws = weights(n, k)
        cells = []
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            cells.append(cell(arch, name, n, k, x, ws))
        print(f"{name:10s}{f'{n} x {k}':>16s}" + "".join(f"{c:>{width}s}" for c in cells))
        del ws


def l2_hot_cell(arch: str, name: str, n: int, k: int, x: torch.Tensor, ws: list) -> str:
    """cuBLAS us per call, the weights from HBM / one copy read again and again (from L2)."""
    return f"{time_us(F.linear, x, ws):6.2f} / {time_us(F.linear, x, ws[:1] * 16):5.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--m", default="1,16,64,256", help="batch sizes (rows of activations)")
    parser.add_argument("--skinny", action="store_true", help="also the Triton skinny GEMM")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--sweep", help="M list: cuBLAS against skinny_gemm's launch shapes")
    parser.add_argument("--compile", help="i/n: with --sweep, only compile that share of it")
    parser.add_argument("--l2-hot", action="store_true", help="cuBLAS, weights in HBM vs in L2")
    args = parser.parse_args()
    ms = [int(m) for m in args.m.split(",")]
    if args.l2_hot:
        for arch in args.arch.split(","):
            table("cuBLAS us per call, weights from HBM / in L2", arch, ms, 16, l2_hot_cell)
        return
    if args.sweep:
        shard = None
        if args.compile:
            i, n = (int(v) for v in args.compile.split("/"))
            shard = (i, n)
        sweep([int(m) for m in args.sweep.split(",")], shard)
        return
    copy_tbs = copy_bandwidth() / 1e12
    print(f"{torch.cuda.get_device_name()}: copy {copy_tbs:.2f} TB/s (read + write)")
    rows = []

    def cell(arch: str, name: str, n: int, k: int, x: torch.Tensor, ws: list) -> str:
        m = x.shape[0]
        us = time_us(F.linear, x, ws)
        tbs = weight_tb_s(n, k, us)
        e_us = time_us(lambda x, w: linear(x, w, None), x, ws)  # what the layers run
        e_tbs = weight_tb_s(n, k, e_us)
        row = {"arch": arch, "gemm": name, "n": n, "k": k, "m": m, "us": us, "tb_s": tbs}
        row |= {"engine_us": e_us, "engine_tb_s": e_tbs}
        text = f"{tbs:5.2f} / {e_tbs:5.2f} ({e_tbs / copy_tbs:4.0%})"
        if args.skinny and m <= 16:
            s_us, config = best_skinny(m, n, k, ws)
            s_tbs = weight_tb_s(n, k, s_us)
            row |= {"skinny_us": s_us, "skinny_tb_s": s_tbs, "skinny": repr(config)}
            text += f" skinny {s_tbs:5.2f} {config}"
        rows.append(row)
        return text

    for arch in args.arch.split(","):
        table("weight TB/s, cuBLAS / the engine's linear (its share of copy)", arch, ms, 22, cell)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tbs, "rows": rows}, f
            )


if __name__ == "__main__":
    main()
