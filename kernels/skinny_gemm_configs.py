"""Launch shapes of kernels/skinny_gemm.py, and which GEMMs take it instead of cuBLAS.

Up to 16 rows every small weight does (``config_for``: one shape per N x K). Beyond 16 rows
cuBLAS is faster for most shapes; ``MORE_ROWS`` lists the Qwen3-0.6B shapes and row counts where
the kernel measured faster on an H200 (``python -m bench.gemm_bench --sweep 32,64,128,256``,
each GEMM in a CUDA graph over cold weights; gate_up against cuBLAS then SiLU-and-mul):

| GEMM (N x K) | M | cuBLAS us | skinny us |
|---|---|---|---|
| o_proj 1024 x 2048 | 32 | 5.81 | 5.22 |
| gate_up 6144 x 1024, gated | 32 / 64 | 8.04 / 8.25 | 6.83 / 7.30 |
| down 1024 x 3072 | 32 / 64 | 7.97 / 8.21 | 6.28 / 6.94 |

At 128 and 256 rows cuBLAS won every shape (o_proj 5.99 / 6.36 us against 7.03 / 8.14), and
the fused qkv at every row count (5.26 us against 5.56 at 32 rows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import triton

MAX_ROWS = 16  # one tl.dot tile of activation rows: every small weight takes the kernel


@dataclass(frozen=True)
class SkinnyGemmConfig:
    """Launch shape of one (N, K): column block, K tile, K slices, warps and pipeline stages."""

    block_n: int
    block_k: int
    split_k: int
    warps: int
    stages: int
    block_m: int = 16  # activation rows per program


# Weights up to this size go through skinny_gemm at M <= MAX_ROWS; larger ones reach the copy
# bandwidth through cuBLAS already (docs/gpu.md, "Decode GEMMs").
MAX_WEIGHT_BYTES = 32 * 2**20


@functools.cache
def config_for(n: int, k: int) -> SkinnyGemmConfig:
    """The launch shape for an N x K weight, measured on an H200 (bench.gemm_bench, then the
    decode step): wide column blocks for wide outputs. Narrow outputs (fewer than 64 column
    blocks for 132 SMs) split K into one K tile per program: each program then reads its whole
    weight slice before the PDL wait, while the kernel before it is still running (Qwen3-0.6B's
    o_proj and down_proj: 8 and 12 slices; batch-1 step 979 -> 929 us against 4 slices)."""
    block_n, block_k = (64 if n >= 6144 else 32), 256
    split_k = triton.cdiv(k, block_k) if triton.cdiv(n, block_n) < 64 else 1
    return SkinnyGemmConfig(block_n=block_n, block_k=block_k, split_k=split_k, warps=4, stages=4)


@functools.cache
def gated_config_for(n: int, k: int) -> SkinnyGemmConfig:
    """The gated GEMM of an N x K weight: the plain launch's programs, each with half as many
    output columns (it reads a gate and an up row for each)."""
    plain = config_for(n, k)
    return replace(plain, block_n=plain.block_n // 2)


def _shape(block_n: int, split_k: int, block_m: int) -> SkinnyGemmConfig:
    return SkinnyGemmConfig(block_n, 128, split_k, warps=4, stages=3, block_m=block_m)


# (N, K, gated) -> ((up to M rows, launch shape), ...): the sweep's fastest, where it beat cuBLAS.
MORE_ROWS: dict[tuple[int, int, bool], tuple[tuple[int, SkinnyGemmConfig], ...]] = {
    (1024, 2048, False): ((32, _shape(32, 8, 16)),),  # o_proj
    (6144, 1024, True): ((32, _shape(32, 1, 16)), (64, _shape(32, 1, 64))),  # gate_up
    (1024, 3072, False): ((32, _shape(32, 4, 32)), (64, _shape(32, 4, 64))),  # down
}


def config_at(n: int, k: int, m: int, gated: bool) -> SkinnyGemmConfig | None:
    """The launch shape of ``M x K @ (N x K).T`` (``gated``: with SiLU-and-mul), or None where
    cuBLAS is the faster (more than 16 rows, outside ``MORE_ROWS``)."""
    if m <= MAX_ROWS:
        return gated_config_for(n, k) if gated else config_for(n, k)
    return next((c for rows, c in MORE_ROWS.get((n, k, gated), ()) if m <= rows), None)
