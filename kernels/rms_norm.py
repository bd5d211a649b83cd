"""RMSNorm over the last dimension, with an optional residual add fused in front of it.

``rms_norm`` is the Triton kernel (one program per token row, the whole row in one tile);
``rms_norm_ref`` is the torch reference, the same operations ``models.layers.layernorm.RMSNorm``
runs on CPU. The kernel rounds where the reference rounds: the residual sum to the input dtype, the
normalised row to the input dtype before the weight multiply, and the product to the output dtype
(``promote(x.dtype, weight.dtype)``), so only the float32 sum of squares and ``rsqrt`` can differ.
Not a layer: no parameters, no dispatch between CPU and GPU (the layer does that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_for_previous

MAX_HIDDEN = 65536  # one row is one tile; wider rows would need a loop


def _norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or ``(norm(x + residual), x + residual)`` when ``residual`` is given."""
    if residual is None:
        return _norm_ref(x, weight, eps)
    x = x + residual
    return _norm_ref(x, weight, eps), x


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    stride_xt,
    stride_rt,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= HIDDEN
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HIDDEN
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)  # before the wait: weights are constant
    wait_for_previous(USE_PDL)
    x = tl.load(x_ptr + token * stride_xt + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + token * stride_rt + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + token * HIDDEN + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / HIDDEN
    normed = (x32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + token * HIDDEN + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rms_norm_inputs(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be [H={x.shape[1]}], got {tuple(weight.shape)}")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[1]} > {MAX_HIDDEN} is not supported")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"x and weight must be floating point, got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(0) != 1:
        raise ValueError("x and weight must be contiguous in the hidden dimension")
    tensors = [x, weight]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x {tuple(x.shape)} {x.dtype}, "
                f"got {tuple(residual.shape)} {residual.dtype}"
            )
        if residual.stride(1) != 1:
            raise ValueError("residual must be contiguous in the hidden dimension")
        tensors.append(residual)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _checked_out(
    name: str, out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``out`` after checking it is a contiguous tensor like ``like`` of ``dtype``; else a new one."""
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if out.shape != like.shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be {tuple(like.shape)} {dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def rms_norm(
    x: torch.Tensor,  # [T, H], rows may be strided
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H], same dtype as x
    *,
    out: torch.Tensor | None = None,  # [T, H] contiguous; fresh when None
    residual_out: torch.Tensor | None = None,  # [T, H] contiguous; fresh when None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out`` or ``(out, residual_out)``, as ``rms_norm_ref``. No host sync (CUDA-graph safe).

    ``out`` has dtype ``promote(x.dtype, weight.dtype)``; ``residual_out = x + residual`` in x's
    dtype. Each row is read whole before it is written, so the outputs may alias contiguous inputs.
    """
    _check_rms_norm_inputs(x, weight, residual)
    if residual is None and residual_out is not None:
        raise ValueError("residual_out needs a residual")
    num_tokens, hidden = x.shape
    out = _checked_out("out", out, x, torch.promote_types(x.dtype, weight.dtype))
    new_residual = None
    if residual is not None:
        new_residual = _checked_out("residual_out", residual_out, x, x.dtype)
    if num_tokens > 0:
        block_h = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_tokens,)](
            x,
            x if residual is None else residual,
            weight,
            out,
            out if new_residual is None else new_residual,  # unused without a residual
            x.stride(0),
            x.stride(0) if residual is None else residual.stride(0),
            eps,
            HIDDEN=hidden,
            BLOCK_H=block_h,
            HAS_RESIDUAL=residual is not None,
            num_warps=max(1, min(16, block_h // 256)),
            enable_fp_fusion=False,  # an FMA would skip a rounding the reference does
            **launch_options(x.device),
        )
    return out if new_residual is None else (out, new_residual)
