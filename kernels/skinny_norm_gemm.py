"""Residual add, RMSNorm and the decode GEMM after it in one kernel: ``y = norm(x + r) @ w.T``.

Each decoder layer runs an RMSNorm (with the residual add) before its QKV and its gate_up
projections. At decode batch sizes (M <= 16 rows) that norm is a kernel of its own, whose cost is
nearly all launch and latency; here it is the GEMM's prologue. Every program first reads its rows
in full (M x K activations: a few KB, from L2) for their sums of squares, then walks its K slice
as ``kernels.skinny_gemm`` does, normalising each activation tile on the way into ``tl.dot``.
Program (0, 0) also writes ``x + r``, the next residual, to its own buffer (the other programs are
still reading ``r``). The rounding points are ``kernels.rms_norm``'s (the sum rounded to the input
dtype, the normalised row rounded before the weight multiply); the sum of squares is added up in
another order, so the two paths can differ by a rounding of the norm. Eager and graphed steps of
the same size take the same path. ``skinny_norm_gemm_ref`` is the pair in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import wait_for_previous
from kernels.skinny_gemm import SkinnyGemmConfig, check_inputs, plan_launch, write_out


def skinny_norm_gemm_ref(x, residual, norm_weight, eps, w):
    """``(F.linear(norm(x + residual)), x + residual)``; without a residual, ``x`` is the sum."""
    from kernels.rms_norm import rms_norm_ref

    if residual is None:
        return torch.nn.functional.linear(rms_norm_ref(x, norm_weight, eps), w), x
    normed, summed = rms_norm_ref(x, norm_weight, eps, residual)
    return torch.nn.functional.linear(normed, w), summed


@triton.jit
def _summed(x_ptr, r_ptr, rows, ks, mask, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    """``x + r`` of a tile, rounded to x's dtype as the separate add does."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_rm + ks[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _norm_gemm_kernel(
    x_ptr, r_ptr, g_ptr, sum_ptr, w_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K,
    stride_xm, stride_rm, stride_wn, stride_ym, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, PRECISION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, 16)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    dtype = x_ptr.dtype.element_ty
    wait_for_previous(USE_PDL)
    squares = tl.zeros((16,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < K)[None, :]
        h = _summed(x_ptr, r_ptr, rows, ks, mask, stride_xm, stride_rm, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if (pid_n == 0) & (split == 0):
                tl.store(sum_ptr + rows[:, None] * K + ks[None, :], h, mask=mask)
        h32 = h.to(tl.float32)
        squares += tl.sum(h32 * h32, axis=1)
    rstd = tl.rsqrt(squares / K + eps)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    k_begin = split * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = k_begin + k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        mask = row_mask[:, None] & k_mask[None, :]
        h = _summed(x_ptr, r_ptr, rows, ks, mask, stride_xm, stride_rm, HAS_RESIDUAL)
        normed = (h.to(tl.float32) * rstd[:, None]).to(dtype)
        g = tl.load(g_ptr + ks, mask=k_mask, other=0.0)
        a = (g.to(tl.float32)[None, :] * normed.to(tl.float32)).to(dtype)
        w = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    write_out(acc, y_ptr, partial_ptr, counter_ptr, M, N, stride_ym, pid_n, split, BLOCK_N, SPLIT_K)


def skinny_norm_gemm(
    x: torch.Tensor,  # [M, K], M <= 16: the previous block's output (or the embedding)
    residual: torch.Tensor | None,  # [M, K]: the running residual; None for the first layer
    norm_weight: torch.Tensor,  # [K], x's dtype
    eps: float,
    w: torch.Tensor,  # [N, K]
    config: SkinnyGemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual) @ w.T, x + residual)`` as ``skinny_norm_gemm_ref``; the sum is a
    fresh tensor (``x`` itself without a residual). No host sync once the workspace is sized."""
    check_inputs(x, w)
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"residual must be like x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm_weight must be [{x.shape[1]}] {x.dtype}")
    m, (n, k) = x.shape[0], w.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    summed = x if residual is None else torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0:
        return out, summed
    launch = plan_launch(x, w, out, config)
    r = x if residual is None else residual
    _norm_gemm_kernel[launch.grid](
        x, r, norm_weight, summed, w, out, launch.partial, launch.counter, m, n, k,
        x.stride(0), r.stride(0), w.stride(0), out.stride(0), eps,
        HAS_RESIDUAL=residual is not None,
        enable_fp_fusion=False,  # an FMA would skip a rounding the separate kernels do
        **launch.meta,
    )  # fmt: skip
    return out, summed
