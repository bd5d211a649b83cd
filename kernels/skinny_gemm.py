"""Decode GEMM for few rows: ``y = x @ w.T`` with ``x: [M, K]``, ``w: [N, K]`` row-major.

At decode batch sizes a linear layer is a stream over its weight: M rows of activations against
N x K weights, whose bytes are all that matter. Program ``(n, s, m)`` owns ``BLOCK_N`` output
columns of ``BLOCK_M`` activation rows (16 for up to 16 rows) and the ``s``-th of ``SPLIT_K``
slices of K; it walks its slice in ``BLOCK_K`` tiles, each one ``tl.dot`` of the (padded)
activation rows against a weight tile, accumulating in float32. With one slice the program
writes its columns; with several, each slice writes its float32 partial to a workspace and bumps
the counter of its row and column block, and the program that arrives last adds the slices in
slice order (the sum does not depend on who came last) and writes the result, then resets the
counter so that the next call (or graph replay) starts from zero.

``gated=True`` is the MLP's gate_up projection with SiLU-and-mul in its epilogue: program ``n``
reads the gate rows and the up rows of its output columns and writes ``silu(gate) * up``, so the
activation needs no kernel of its own at decode. (Folding SiLU-and-mul into the down
projection's loads instead was tried: on an H200 that kernel took 15 us where SiLU-and-mul and
the GEMM took 1.1 + 5.7 us.)

``skinny_gemm_ref`` is ``F.linear``, what the layers run elsewhere; both accumulate in float32,
so they differ by summation order only. Not a layer: ``models.layers.linear`` decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import skinny_gemm_configs as configs
from kernels.pdl import launch_options, wait_for_previous
from kernels.skinny_gemm_configs import SkinnyGemmConfig, config_for, gated_config_for

__all__ = ["SkinnyGemmConfig", "config_for", "gated_config_for", "skinny_gemm", "use_skinny"]


def skinny_gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


@triton.jit
def _gated(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up`` rounded where the layers round: GEMM outputs, then SiLU, then the
    product (kernels.silu_and_mul)."""
    gate = gate.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return silu * up.to(dtype).to(tl.float32)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    partial_ptr,  # [SPLIT_K, M, N] float32 (SPLIT_K > 1; N = 2 N_OUT when GATED)
    counter_ptr,  # [cdiv(M, BLOCK_M) * cdiv(N_OUT, BLOCK_N)] int32, zero between calls
    M,
    N_OUT,  # output columns: N, or N / 2 when GATED
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
    GATED: tl.constexpr,  # y = silu(x @ w[:N_OUT].T) * (x @ w[N_OUT:].T)
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32)
    USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N_OUT
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    up_rows = w_rows + N_OUT * stride_wn  # GATED: the up projection's rows of these columns
    k_begin = split * K_PER_SPLIT
    # The first weight tiles are read before waiting for the kernel that writes x (weights are
    # never written): with PDL that read overlaps the previous kernel's end.
    ks = k_begin + tl.arange(0, BLOCK_K)
    w_mask = col_mask[:, None] & (ks < K)[None, :]
    w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
    if GATED:
        w_up = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
    wait_for_previous(USE_PDL)
    x = tl.load(
        x_ptr + rows[:, None] * stride_xm + ks[None, :],
        mask=row_mask[:, None] & (ks < K)[None, :],
        other=0.0,
    )
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.dot(x, tl.trans(w), zeros, input_precision=PRECISION)
    acc_up = zeros
    if GATED:
        acc_up = tl.dot(x, tl.trans(w_up), zeros, input_precision=PRECISION)
    for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
        ks = k_begin + k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_mask = col_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=PRECISION)
    out_mask = row_mask[:, None] & col_mask[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    dtype = y_ptr.dtype.element_ty
    if SPLIT_K == 1:
        if GATED:
            acc = _gated(acc, acc_up, dtype)
        tl.store(y_ptrs, acc.to(dtype), mask=out_mask)
    else:
        n = N_OUT * 2 if GATED else N_OUT  # partial columns: the up half after the gate half
        offsets = rows[:, None] * n + cols[None, :]
        tl.store(partial_ptr + split * M * n + offsets, acc, mask=out_mask)
        if GATED:
            tl.store(partial_ptr + split * M * n + offsets + N_OUT, acc_up, mask=out_mask)
        # Every thread's partial is stored before the one thread doing the atomic releases them
        # (the release orders only what that thread has seen: hence the barrier first).
        tl.debug_barrier()
        counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last slice of this column block: sum them in order
            total = zeros
            total_up = zeros
            for s in range(SPLIT_K):
                partial = partial_ptr + s * M * n + offsets  # written by other SMs: skip L1
                total += tl.load(partial, mask=out_mask, other=0.0, cache_modifier=".cg")
                if GATED:
                    up = tl.load(partial + N_OUT, mask=out_mask, other=0.0, cache_modifier=".cg")
                    total_up += up
            if GATED:
                total = _gated(total, total_up, dtype)
            tl.store(y_ptrs, total.to(dtype), mask=out_mask)
            tl.atomic_xchg(counter, 0)


def use_skinny(x: torch.Tensor, w: torch.Tensor, gated: bool = False) -> bool:
    """Whether ``x @ w.T`` (``gated``: and SiLU-and-mul) goes through skinny_gemm: CUDA, a small
    half-precision weight, and few rows (at most 16, or a shape and row count measured faster
    than cuBLAS: ``config_at``)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and w.dim() == 2
        and configs.MAX_WEIGHT_BYTES >= w.numel() * w.element_size()
        and configs.config_at(w.shape[0], w.shape[1], x.shape[0], gated) is not None
        and x.dtype == w.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.stride(1) == 1
        and w.stride(1) == 1
    )


class Workspace:
    """The split-K partials and counters of each device, grown on demand. A buffer that is
    outgrown is kept, never freed: a CUDA graph captured with it still reads and writes it."""

    def __init__(self) -> None:
        self.partials: dict[torch.device, torch.Tensor] = {}
        self.counters: dict[torch.device, torch.Tensor] = {}
        self._outgrown: list[torch.Tensor] = []

    def get(self, device: torch.device, floats: int, blocks: int) -> tuple[torch.Tensor, ...]:
        """At least ``floats`` float32 partials and ``blocks`` zeroed int32 counters."""
        partial = self._at_least(self.partials, device, floats, torch.float32, torch.empty)
        counter = self._at_least(self.counters, device, blocks, torch.int32, torch.zeros)
        return partial, counter

    def _at_least(self, store: dict, device: torch.device, size: int, dtype, make) -> torch.Tensor:
        buffer = store.get(device)
        if buffer is None or buffer.numel() < size:
            if buffer is not None:
                self._outgrown.append(buffer)
            buffer = store[device] = make(max(size, 1), dtype=dtype, device=device)
        return buffer


WORKSPACE = Workspace()


def skinny_gemm(
    x: torch.Tensor,  # [M, K], rows may be strided
    w: torch.Tensor,  # [N, K], contiguous in K
    config: SkinnyGemmConfig | None = None,  # None: skinny_gemm_configs.config_at
    out: torch.Tensor | None = None,  # [M, N] ([M, N / 2] when gated); fresh when None
    gated: bool = False,
) -> torch.Tensor:
    """``x @ w.T`` in x's dtype, as ``skinny_gemm_ref``; ``gated``: ``silu(g) * u`` of that
    product's halves ``[g | u]`` (the MLP's gate_up projection and its activation in one
    kernel, as ``silu_and_mul_ref(skinny_gemm_ref(x, w))``; a column block reads the gate and up
    rows of its columns, the weight bytes of a plain block twice as wide). No host sync (CUDA-
    graph safe) once the workspace is big enough for the shape (a shape's first call allocates)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x [M, K] and w [N, K] needed, got {tuple(x.shape)}, {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous in K")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must have one dtype, got {x.dtype}, {w.dtype}")
    if gated and w.shape[0] % 2:
        raise ValueError(f"a gated w stacks gate and up rows: an even N needed, got {w.shape[0]}")
    m, (n, k) = x.shape[0], w.shape
    n_out = n // 2 if gated else n
    if out is None:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    c = config or configs.config_at(n, k, m, gated)
    if c is None:  # more rows than any measured launch shape of N x K: the 16-row one
        c = gated_config_for(n, k) if gated else config_for(n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, c.split_k), c.block_k) * c.block_k
    split_k = triton.cdiv(k, k_per_split)
    blocks, m_blocks = triton.cdiv(n_out, c.block_n), triton.cdiv(m, c.block_m)
    partial, counter = out, out
    if split_k > 1:
        partial, counter = WORKSPACE.get(x.device, split_k * m * n, blocks * m_blocks)
    _skinny_gemm_kernel[(blocks, split_k, m_blocks)](
        x,
        w,
        out,
        partial,
        counter,
        m,
        n_out,
        k,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        SPLIT_K=split_k,
        K_PER_SPLIT=k_per_split,
        GATED=gated,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=c.warps,
        num_stages=c.stages,
        **launch_options(x.device),
    )
    return out
