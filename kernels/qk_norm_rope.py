"""Per-head RMSNorm of q and k followed by neox-style (rotate-half) RoPE, in one kernel, in place.

``qk_norm_rope`` is the Triton kernel: program ``(t, 0)`` rewrites every query head of token ``t``
and program ``(t, 1)`` every key head, each head held as its two halves so rotate-half needs no
shuffle. ``qk_norm_rope_ref`` is the torch reference, the operations Qwen3's attention runs on CPU
(``q_norm``/``k_norm``, then ``RotaryEmbedding``). The kernel rounds to the input dtype wherever
the reference does (normalised row, weight product, cos/sin, each rope product and their sum), so
only the float32 sum of squares and ``rsqrt`` can differ. Not a layer: no parameters.

``qk_norm_rope_store_kv`` is the same kernel whose key program also writes the finished k row and
the v row to the paged cache: ``qk_norm_rope`` then ``kernels.store_kvcache``, bit for bit, in one
launch instead of two per layer and step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_for_previous
from kernels.store_kvcache import check_store_inputs


def _norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope_ref(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, H_q, D]
    k: torch.Tensor,  # [T, H_kv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    cos_cache: torch.Tensor,  # [P, D]
    sin_cache: torch.Tensor,  # [P, D]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope(norm(q)), rope(norm(k))`` as new tensors; the inputs are left unchanged."""
    q = _norm_ref(q, q_weight, eps)
    k = _norm_ref(k, k_weight, eps)
    cos = cos_cache[positions].to(q.dtype).unsqueeze(1)  # [T, 1, D]
    sin = sin_cache[positions].to(q.dtype).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@triton.jit
def _norm_rope_heads(
    x_ptr,  # this token's first head
    stride_h,
    weight_ptr,
    cos1,  # [1, BLOCK_HALF] float32 holding values of the input dtype
    cos2,
    sin1,
    sin2,
    eps,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    ptrs = x_ptr + heads * stride_h + dims  # [BLOCK_HEADS, BLOCK_HALF]: first halves
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
    inv_rms = tl.rsqrt(variance + eps)[:, None]
    w1 = tl.load(weight_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(weight_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    n1 = (w1 * (x1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    n2 = (w2 * (x2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # rotate_half(n) = [-n2, n1]; (-a) * b rounds to -(a * b), so subtract the rounded product.
    out1 = (n1 * cos1).to(dtype).to(tl.float32) - (n2 * sin1).to(dtype).to(tl.float32)
    out2 = (n2 * cos2).to(dtype).to(tl.float32) + (n1 * sin2).to(dtype).to(tl.float32)
    tl.store(ptrs, out1.to(dtype), mask=mask)
    tl.store(ptrs + HALF, out2.to(dtype), mask=mask)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _qk_norm_rope_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    q_weight_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    eps,
    v_ptr,  # the rest: only read when STORE_KV
    stride_vt,
    stride_vh,
    k_cache_ptr,  # [num_blocks, block_size, H_kv, D] contiguous
    v_cache_ptr,
    slot_mapping_ptr,
    STORE_KV: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # head_dim / 2
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    # Before the wait: positions and slots are the step's inputs (copied before its first
    # kernel), cos/sin constant; only q, k and v come from the kernel before this one.
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < HALF
    cos_row = cos_ptr + pos * stride_cos
    sin_row = sin_ptr + pos * stride_sin
    cos1 = tl.load(cos_row + dims, mask=dim_mask, other=0.0).to(dtype).to(tl.float32)
    cos2 = tl.load(cos_row + HALF + dims, mask=dim_mask, other=0.0).to(dtype).to(tl.float32)
    sin1 = tl.load(sin_row + dims, mask=dim_mask, other=0.0).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_row + HALF + dims, mask=dim_mask, other=0.0).to(dtype).to(tl.float32)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64) if STORE_KV else -1
    wait_for_previous(USE_PDL)
    if tl.program_id(1) == 0:
        _norm_rope_heads(
            q_ptr + token * stride_qt,
            stride_qh,
            q_weight_ptr,
            cos1,
            cos2,
            sin1,
            sin2,
            eps,
            NUM_Q_HEADS,
            HALF,
            BLOCK_Q_HEADS,
            BLOCK_HALF,
        )
    else:
        k1, k2 = _norm_rope_heads(
            k_ptr + token * stride_kt,
            stride_kh,
            k_weight_ptr,
            cos1,
            cos2,
            sin1,
            sin2,
            eps,
            NUM_KV_HEADS,
            HALF,
            BLOCK_KV_HEADS,
            BLOCK_HALF,
        )
        if STORE_KV:
            if slot >= 0:
                heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
                mask = (heads < NUM_KV_HEADS) & dim_mask
                row = slot * (NUM_KV_HEADS * 2 * HALF) + heads * (2 * HALF) + dims
                cache_ty = k_cache_ptr.dtype.element_ty
                tl.store(k_cache_ptr + row, k1.to(cache_ty), mask=mask)
                tl.store(k_cache_ptr + row + HALF, k2.to(cache_ty), mask=mask)
                v_row = v_ptr + token * stride_vt + heads * stride_vh + dims
                v1 = tl.load(v_row, mask=mask)
                v2 = tl.load(v_row + HALF, mask=mask)
                tl.store(v_cache_ptr + row, v1.to(cache_ty), mask=mask)
                tl.store(v_cache_ptr + row + HALF, v2.to(cache_ty), mask=mask)


def _check_qk_norm_rope_inputs(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *rope: torch.Tensor
) -> None:
    q_weight, k_weight, cos_cache, sin_cache = rope
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k must be [T, H_q, D], [T, H_kv, D], got {q.shape}, {k.shape}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"q and k must share one floating dtype, got {q.dtype}, {k.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must be contiguous in their last (head_dim) dimension")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,) or w.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [D={head_dim}], got {tuple(w.shape)}")
        if torch.promote_types(q.dtype, w.dtype) != q.dtype:
            raise ValueError(f"{name} dtype {w.dtype} would promote q's {q.dtype}: not in place")
    if cos_cache.dim() != 2 or cos_cache.shape[1] != head_dim or sin_cache.shape != cos_cache.shape:
        raise ValueError(
            f"cos/sin caches must be [P, D={head_dim}], got {cos_cache.shape}, {sin_cache.shape}"
        )
    if cos_cache.stride(1) != 1 or sin_cache.stride(1) != 1:
        raise ValueError("cos/sin caches must be contiguous in their last dimension")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [T={num_tokens}] int32/int64, got {positions.shape}")
    devices = {t.device for t in (positions, q, k, q_weight, k_weight, cos_cache, sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def qk_norm_rope(
    positions: torch.Tensor,  # [T] int32/int64, each < P (not checked: that would sync)
    q: torch.Tensor,  # [T, H_q, D], rows/heads may be strided (views of the fused qkv output)
    k: torch.Tensor,  # [T, H_kv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    cos_cache: torch.Tensor,  # [P, D], any float dtype (cast to q's dtype, as the reference does)
    sin_cache: torch.Tensor,  # [P, D]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite q and k with ``qk_norm_rope_ref``'s result and return them. No host sync."""
    _check_qk_norm_rope_inputs(positions, q, k, q_weight, k_weight, cos_cache, sin_cache)
    rope = (q_weight, k_weight, cos_cache, sin_cache, eps)
    _launch(positions, q, k, *rope, k, k, k, positions, store_kv=False)  # k, k, k: never read
    return q, k


def qk_norm_rope_store_kv(
    positions: torch.Tensor,  # [T] int32/int64
    q: torch.Tensor,  # [T, H_q, D]
    k: torch.Tensor,  # [T, H_kv, D]
    v: torch.Tensor,  # [T, H_kv, D], read only
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    cos_cache: torch.Tensor,  # [P, D]
    sin_cache: torch.Tensor,  # [P, D]
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D], contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D], contiguous
    slot_mapping: torch.Tensor,  # [T] int32/int64, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_norm_rope``, then ``store_kvcache`` of the new k and ``v``, in one launch. No sync."""
    _check_qk_norm_rope_inputs(positions, q, k, q_weight, k_weight, cos_cache, sin_cache)
    check_store_inputs(k, v, k_cache, v_cache, slot_mapping)
    rope = (q_weight, k_weight, cos_cache, sin_cache, eps)
    _launch(positions, q, k, *rope, v, k_cache, v_cache, slot_mapping, store_kv=True)
    return q, k


def _launch(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    eps: float,
    v: torch.Tensor,  # this and the next three: only read when store_kv
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    store_kv: bool,
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    block_q_heads = triton.next_power_of_2(num_q_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    _qk_norm_rope_kernel[(num_tokens, 2)](
        positions,
        q,
        k,
        q_weight,
        k_weight,
        cos_cache,
        sin_cache,
        *q.stride()[:2],
        *k.stride()[:2],
        cos_cache.stride(0),
        sin_cache.stride(0),
        eps,
        v,
        *v.stride()[:2],
        k_cache,
        v_cache,
        slot_mapping,
        STORE_KV=store_kv,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=head_dim // 2,
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=max(1, min(8, block_q_heads * block_half // 256)),
        enable_fp_fusion=False,  # an FMA would skip a rounding the reference does
        **launch_options(q.device),
    )
