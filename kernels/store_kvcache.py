"""Scatter newly computed K/V rows into the paged KV cache by slot mapping.

A slot is ``block_id * block_size + offset``; slot -1 means "do not store" (padding).
``store_kvcache`` is the Triton kernel (one program per token, all KV heads at once);
``store_kvcache_ref`` is the torch reference it is tested against. Neither checks that slots are
inside the cache: the scheduler owns allocation, and checking would need a device sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_kvcache_ref(
    k: torch.Tensor,  # [T, H_kv, D]
    v: torch.Tensor,  # [T, H_kv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    slot_mapping: torch.Tensor,  # [T] int, -1 = skip
) -> None:
    """Reference: ``k_cache.flatten(0, 1)[slot] = k`` for every slot != -1."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


@triton.jit
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HD: tl.constexpr,  # next power of two >= NUM_KV_HEADS * HEAD_DIM
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HD)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    row_len = tl.where(slot >= 0, NUM_KV_HEADS * HEAD_DIM, 0)  # 0: skip this token
    mask = offs < row_len
    cache_offs = slot * (NUM_KV_HEADS * HEAD_DIM) + offs
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + dim, mask=mask)
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + dim, mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_store_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [T, H_kv, D], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, H_kv, D], "
            f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache rows {tuple(k_cache.shape[2:])} != k rows {tuple(k.shape[1:])}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if k.dtype != v.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k/v dtypes {k.dtype}/{v.dtype}, cache {k_cache.dtype}/{v_cache.dtype}")
    if not (k.dtype.is_floating_point and k_cache.dtype.is_floating_point):
        raise ValueError(f"k and the cache must be floating point, got {k.dtype}, {k_cache.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v must be contiguous in their last (head_dim) dimension")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def store_kvcache(
    k: torch.Tensor,  # [T, H_kv, D], rows may be strided (a view of the fused qkv output)
    v: torch.Tensor,  # [T, H_kv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D], contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D], contiguous
    slot_mapping: torch.Tensor,  # [T] int32 or int64, -1 = skip
) -> None:
    """Write ``k[t]``/``v[t]`` to cache slot ``slot_mapping[t]`` (cast to the cache dtype)."""
    check_store_inputs(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim),
        num_warps=4,
    )
