"""Paged prefill attention: new query tokens against cached + new keys, causal (Triton).

Covers chunked prefill and prefill after a prefix-cache hit (and plain prefill, where the cached
prefix is empty). Sequences are packed back to back (``cu_seqlens_q``); query token ``i`` of
sequence ``b`` sits at position ``seq_lens[b] - q_len[b] + i`` and sees cache positions up to it.
The new tokens' K/V must already be in the cache (``store_kvcache`` runs first).

One program handles one tile of query tokens of one sequence for one KV head. The tile's rows are
(token, query head of the group) pairs, ``BLOCK_M // GROUP`` tokens x ``GROUP`` heads, so each K/V
tile is loaded once for the whole GQA group. Key tiles entirely below the tile's first query
position need no causal mask; only the last few tiles near the diagonal are masked.

The grid's first axis numbers query tiles across the whole step, not per sequence: sequence ``b``
owns the tiles from ``cu_seqlens_q[b] // BLOCK_Q + b`` on (``_first_tile``, a bound on the tiles of
the sequences before it), and a program finds its sequence by binary search. So the grid has
``T // BLOCK_Q + B`` tiles for ``T`` packed tokens, at most ``B`` of them empty, whatever the
longest sequence: a step of a few long prompts beside many one-token rows (a mixed step) launches
no program per (short row, tile of the longest prompt), and a graph sized for its token count and
rows needs no grid of rows x tokens.

Not here: one query per sequence with split contexts (``paged_decode_attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.paged_attention import check_paged_kv_inputs, paged_attention_ref
from kernels.paged_kv_tile import kv_tile_offsets


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters: rows (token x head) per query tile, keys per K/V tile, warps, stages."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, H_q, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int
    seq_lens: torch.Tensor,  # [B] int
    block_tables: torch.Tensor,  # [B, max_num_blocks] int
    max_seqlen_q: int,
    scale: float,
) -> torch.Tensor:  # [T, H_q, D]
    """Reference: the general paged attention (``max_seqlen_q`` is not needed there)."""
    del max_seqlen_q
    return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale)


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, D]
    m_i,
    l_i,
    acc,
    q_pos,  # [BLOCK_M] position of each row's query token
    n0,
    seq_len,
    bt_row,
    k_cache_ptr,
    v_cache_ptr,
    head_off,
    scale_log2,
    stride_cache_block,
    stride_cache_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_IN_ONE_BLOCK: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the tile is visible to every row
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tok, tok_mask, kv_offs = kv_tile_offsets(  # kv_offs: [BLOCK_N, D]
        bt_row, n0, seq_len, offs_n, offs_d, stride_cache_block, stride_cache_tok, head_off,
        BLOCK_SIZE, TILE_IN_ONE_BLOCK,
    )  # fmt: skip
    if MASKED:
        k = tl.load(k_cache_ptr + kv_offs, mask=tok_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=tok_mask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_offs)
        v = tl.load(v_cache_ptr + kv_offs)
    s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (tok[None, :] <= q_pos[:, None]) & tok_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _first_tile(q_start, seq, BLOCK_Q: tl.constexpr):
    """The first grid tile of sequence ``seq``, whose query tokens start at ``q_start``
    (``cu_seqlens_q[seq]``): at least the tiles all sequences before it need
    (``cdiv(q_len, BLOCK_Q) <= q_len // BLOCK_Q + 1`` each), increasing with ``seq``."""
    return q_start // BLOCK_Q + seq


# The block table's width and the number of sequences change from step to step: specializing on
# them (1, a multiple of 16, anything else) would compile new variants while serving, after the
# warm-up (warm_up.py).
@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_bt,
    num_seqs,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile: BLOCK_Q tokens x GROUP heads, padded
    BLOCK_Q: tl.constexpr,  # query tokens per tile = BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,
    TILE_IN_ONE_BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = 0  # the last sequence whose first tile is <= tile: binary search over [0, num_seqs)
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _first_tile(tl.load(cu_seqlens_q_ptr + mid), mid, BLOCK_Q) <= tile:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_tile = tile - _first_tile(q_start, seq, BLOCK_Q)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len + q_tile * BLOCK_Q  # position of the tile's first query token
    last_pos = tl.minimum(first_pos + BLOCK_Q - 1, seq_len - 1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    token = q_tile * BLOCK_Q + offs_m // GROUP  # query token index within the sequence
    q_head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = seq_len - q_len + token
    q_rows = (q_start + token).to(tl.int64)
    q_offs = q_rows[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + tl.cast(seq, tl.int64) * stride_bt
    head_off = kv_head.to(tl.int64) * stride_cache_head
    # Keys 0 .. first_pos are visible to every row: whole tiles below that need no mask.
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, q_pos, n0, seq_len, bt_row, k_cache_ptr, v_cache_ptr, head_off,
            scale_log2, stride_cache_block, stride_cache_tok,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, TILE_IN_ONE_BLOCK, False,
        )  # fmt: skip
    for n0 in range(unmasked_end, last_pos + 1, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, q_pos, n0, seq_len, bt_row, k_cache_ptr, v_cache_ptr, head_off,
            scale_log2, stride_cache_block, stride_cache_tok,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, TILE_IN_ONE_BLOCK, True,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_offs = q_rows[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def default_prefill_config(
    group: int, head_dim: int, device: torch.device, element_size: int = 2
) -> PrefillConfig:
    """Tiles for the GPU (at D = 128 in half precision the fastest of a sweep on an H100; smaller
    K/V tiles for wider rows, D > 128 or float32, keep the pipelined buffers within an SM's shared
    memory), and small ones for the CPU interpreter, where each tile costs Python time."""
    rows_for_group = max(16, triton.next_power_of_2(group))
    if device.type != "cuda":
        return PrefillConfig(block_m=2 * rows_for_group, block_n=16)
    if head_dim * element_size <= 256:
        return PrefillConfig(block_m=max(64, rows_for_group), block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=max(64, rows_for_group), block_n=32, num_warps=4, num_stages=2)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H_q, D], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, cached + new tokens
    block_tables: torch.Tensor,  # [B, max_num_blocks] int32, -1 padded
    max_seqlen_q: int,  # >= every q_len; the grid needs only the token count (flash-attn uses it)
    scale: float,
    out: torch.Tensor | None = None,  # [T, H_q, D], written in place when given
    config: PrefillConfig | None = None,
) -> torch.Tensor:  # [T, H_q, D]
    """Causal attention of the new tokens of each sequence over its paged context."""
    check_paged_kv_inputs(q, k_cache, v_cache, seq_lens, block_tables)
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be [B+1={num_seqs + 1}] int32, got {tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}"
        )
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, q on {q.device}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    config = config or default_prefill_config(group, head_dim, q.device, q.element_size())
    if config.block_m < 16 or config.block_m < group:
        raise ValueError(f"block_m {config.block_m} must be >= 16 and >= the GQA group {group}")
    if q.shape[0] == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    block_q = config.block_m // group
    grid = (q.shape[0] // block_q + num_seqs, num_kv_heads)  # _first_tile's numbering
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_seqs,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_Q=block_q,
        BLOCK_N=config.block_n,
        TILE_IN_ONE_BLOCK=block_size % config.block_n == 0,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
