"""Causal attention of new query tokens against a paged KV cache (reference implementation).

Covers every case the engine produces: plain prefill, chunked prefill, prefill after a prefix-cache
hit, and decode (one query per sequence). The keys and values of the new tokens must already be in
the cache (the store happens first). Query token ``i`` of sequence ``b`` sits at position
``seq_lens[b] - q_len[b] + i`` and attends to cache positions ``0 .. that position``.
"""

from __future__ import annotations

import torch


def gather_kv_ref(
    cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    block_table: torch.Tensor,  # [max_num_blocks] int
    seq_len: int,
) -> torch.Tensor:  # [seq_len, H_kv, D]
    """Read the first ``seq_len`` token rows of one sequence through its block table."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, H_kv, D]
    return blocks.flatten(0, 1)[:seq_len]


def paged_attention_ref(
    q: torch.Tensor,  # [T, H_q, D], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
    cu_seqlens_q: torch.Tensor,  # [B + 1] int, query offsets into T
    seq_lens: torch.Tensor,  # [B] int, context length (cached + new) per sequence
    block_tables: torch.Tensor,  # [B, max_num_blocks] int
    scale: float,
) -> torch.Tensor:  # [T, H_q, D]
    """Reference: softmax(q k^T * scale + causal mask) v per sequence, in float32."""
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    cu_q = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu_q[b], cu_q[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv_ref(k_cache, block_tables[b], seq_len).float()  # [S, H_kv, D]
        v = gather_kv_ref(v_cache, block_tables[b], seq_len).float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H_q, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[start:end].float().transpose(0, 1)  # [H_q, q_len, D]
        scores = (qb @ k.transpose(1, 2)) * scale  # [H_q, q_len, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def check_paged_kv_inputs(
    q: torch.Tensor,  # [*, H_q, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    """Checks shared by the paged attention wrappers; raises ValueError naming the problem."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, H_kv, D], "
            f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads != 0:
        raise ValueError(
            f"q must be [*, H_q, D={head_dim}] with H_q % {num_kv_heads} == 0, got {tuple(q.shape)}"
        )
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise ValueError(
            f"q, k_cache, v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if q.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q must be contiguous in head_dim and the caches fully contiguous")
    num_seqs = seq_lens.shape[0]
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be [B] int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}"
        )
    if (
        block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
        or block_tables.dtype != torch.int32
    ):
        raise ValueError(
            f"block_tables must be [B={num_seqs}, M] int32, got {tuple(block_tables.shape)} {block_tables.dtype}"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dimension")
    devices = {t.device for t in (q, k_cache, v_cache, seq_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
