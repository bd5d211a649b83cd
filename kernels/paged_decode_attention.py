"""Paged decode attention: one query token per sequence against its cached context (Triton).

One program handles one (sequence, KV head, context split) and reads each K/V row of its split
once for all the query heads that share that KV head (GQA): the group's queries form the rows of a
``[GROUP_PAD, D]`` tile (padded to 16 for ``tl.dot``) against ``[BLOCK_N, D]`` K/V tiles, with an
online softmax in float32. When there are too few (sequence, KV head) pairs to fill the GPU, the
context is split across programs (flash-decoding, ``decode_splits``: how many, which tokens
each): each split writes a normalised partial output and its log-sum-exp, and a second kernel
combines them. A split past its context's end (most of them, at short contexts: the count comes
from the block table's capacity) returns at once, before waiting for the previous kernel, so it
holds no SM while that one runs, and the combine reads only the splits with tokens. The wrapper
never syncs with the device, so it can be captured in a CUDA graph (``num_splits`` depends only
on shapes).

Not here: several query tokens per sequence (``paged_prefill_attention``), the KV store
(``store_kvcache``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.decode_splits import default_num_splits, split_range, splits_with_tokens
from kernels.paged_attention import check_paged_kv_inputs, paged_attention_ref
from kernels.paged_kv_tile import kv_tile_offsets
from kernels.pdl import launch_options, wait_for_previous


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters: K/V rows per tile, warps per program, software-pipelining depth.

    The default was the fastest of a sweep on an H100 (256 seqs x 1024 tokens, Qwen3-0.6B heads,
    bf16): 97% of device copy bandwidth; most configurations there were within 3% of it. On an
    H200 over mixed lengths, 128-row tiles matched it once the grid ran sequences slowest.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


def paged_decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seq_lens: Tensor,
    block_tables: Tensor,
    scale: float,
) -> Tensor:
    """Reference: the general paged attention with one query token per sequence. q [B, H_q, D],
    caches [num_blocks, block_size, H_kv, D], seq_lens [B], block_tables [B, max_num_blocks]
    -> [B, H_q, D]."""
    cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)


# The block table's width changes from step to step: specializing on it (1, a multiple of 16,
# anything else) would compile new variants while serving, after the warm-up (warm_up.py).
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    out_ptr,  # [B, H_q, D] when NUM_SPLITS == 1
    part_out_ptr,  # [B, H_q, NUM_SPLITS, D] float32 when NUM_SPLITS > 1
    part_lse_ptr,  # [B, H_q, NUM_SPLITS] float32 (log2 domain) when NUM_SPLITS > 1
    scale_log2,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_bt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    TILE_IN_ONE_BLOCK: tl.constexpr,  # BLOCK_SIZE % BLOCK_N == 0: one block table entry per tile
    NUM_KV_HEADS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One axis, the sequence slowest: programs start in id order, so all of a sequence's (KV
    # head, split) programs start together, longest contexts first when the rows come sorted
    # (a grid with the sequence fastest starts every head's and split's round of rows in turn).
    pid = tl.program_id(0)
    seq = pid // (NUM_KV_HEADS * NUM_SPLITS)
    kv_head = pid // NUM_SPLITS % NUM_KV_HEADS
    split = pid % NUM_SPLITS
    num_q_heads = NUM_KV_HEADS * GROUP
    # Read before the wait: seq_lens must not come from the kernel launched just before this one
    # (a step's lengths are its inputs, copied before its first kernel).
    seq_len = tl.load(seq_lens_ptr + seq)
    start, tokens_per_split = split_range(seq_len, split, NUM_SPLITS, BLOCK_N)
    if NUM_SPLITS > 1 and start >= seq_len:
        return  # an empty split writes nothing (the combine skips it) and frees its SM at once
    wait_for_previous(USE_PDL)
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q_offs = seq.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None], other=0.0)  # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head.to(tl.int64) * stride_cache_head
    for n0 in range(start, end, BLOCK_N):
        tok, tok_mask, kv_offs = kv_tile_offsets(  # kv_offs: [BLOCK_N, D]
            bt_row, n0, end, offs_n, offs_d, stride_cache_block, stride_cache_tok, head_off,
            BLOCK_SIZE, TILE_IN_ONE_BLOCK,
        )  # fmt: skip
        k = tl.load(k_cache_ptr + kv_offs, mask=tok_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=tok_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # l_i == 0 only for an empty padding sequence (split ones returned above): write zeros.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        o_offs = seq.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (seq.to(tl.int64) * num_q_heads + q_heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(
            part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
            out,
            mask=g_mask[:, None],
        )
        tl.store(
            part_lse_ptr + part,
            m_i + tl.log2(l_i),  # a split that did not return has tokens: l_i > 0
            mask=g_mask,
        )


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,  # [B, H_q, NUM_SPLITS, D] float32; only the splits with tokens written
    part_lse_ptr,  # [B, H_q, NUM_SPLITS] float32, log2 domain; likewise
    seq_lens_ptr,
    out_ptr,  # [B, H_q, D]
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < splits_with_tokens(tl.load(seq_lens_ptr + seq), NUM_SPLITS, BLOCK_N)
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [SPLITS_PAD]
    o = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    total = tl.sum(weight, 0)
    out = tl.sum(o * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_offs = seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty))


def default_decode_config(head_dim: int, element_size: int = 2) -> DecodeConfig:
    """The swept default at half-precision D <= 128; else smaller tiles, to fit shared memory."""
    if head_dim * element_size <= 256:
        return DecodeConfig()
    return DecodeConfig(block_n=32, num_stages=2)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H_q, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    seq_lens: torch.Tensor,  # [B] int32, context length including this token (0 = padding)
    block_tables: torch.Tensor,  # [B, max_num_blocks] int32, -1 padded
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [B, H_q, D], written in place when given
    config: DecodeConfig | None = None,
) -> torch.Tensor:  # [B, H_q, D]
    """Attention of each sequence's single query token over its whole paged context."""
    check_paged_kv_inputs(q, k_cache, v_cache, seq_lens, block_tables)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"q has {q.shape[0]} sequences, seq_lens {seq_lens.shape[0]}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(
            num_seqs, num_kv_heads, block_tables.shape[1] * block_size, q.device
        )
    config = config or default_decode_config(head_dim, q.element_size())
    group = num_q_heads // num_kv_heads
    part_out = part_lse = out  # placeholders, unused when NUM_SPLITS == 1
    if num_splits > 1:
        part_out = torch.empty(
            (num_seqs, num_q_heads, num_splits, head_dim),
            dtype=torch.float32,
            device=q.device,
        )
        part_lse = torch.empty(
            (num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device
        )
    options = launch_options(q.device)
    _paged_decode_kernel[(num_seqs * num_kv_heads * num_splits,)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        out,
        part_out,
        part_lse,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        TILE_IN_ONE_BLOCK=block_size % config.block_n == 0,
        NUM_KV_HEADS=num_kv_heads,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **options,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_seqs, num_q_heads)](
            part_out,
            part_lse,
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            BLOCK_N=config.block_n,
            num_warps=4,
            **options,
        )
    return out
