"""Gated SiLU on the fused gate/up projection output: ``silu(x[:, :I]) * x[:, I:]``.

``silu_and_mul`` is the Triton kernel (program ``(t, j)`` writes columns ``j*BLOCK:(j+1)*BLOCK`` of
token ``t``); ``silu_and_mul_ref`` is the torch reference, the operations the MLP runs on CPU. The
kernel rounds where the reference does (the SiLU result to the input dtype, then the product), so
only ``exp`` can differ. Not a layer: the layer chooses between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_for_previous

BLOCK_COLS = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_xt,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    row = x_ptr + token * stride_xt
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + token * INTERMEDIATE + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask
    )


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x: [T, 2I]`` (rows may be strided) -> contiguous ``[T, I]`` (``out``, or fresh).

    No host sync: safe inside a CUDA graph.
    """
    if x.dim() != 2 or x.shape[1] % 2 != 0:
        raise ValueError(f"x must be [T, 2I], got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    elif out.shape != (num_tokens, intermediate) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {(num_tokens, intermediate)} {x.dtype} on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(BLOCK_COLS, triton.next_power_of_2(intermediate))
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](
        x,
        out,
        x.stride(0),
        INTERMEDIATE=intermediate,
        BLOCK=block,
        num_warps=max(1, min(4, block // 256)),
        enable_fp_fusion=False,  # an FMA would skip a rounding the reference does
        **launch_options(x.device),
    )
    return out
