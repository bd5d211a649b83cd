"""Test helpers: a toy block assignment, AttentionMetadata for it, and KV caches bound to a model.

Stands in for what the worker does for real (block tables come from the scheduler there). Blocks
are dealt out round-robin across sequences, so no sequence's blocks are contiguous and the block
table indirection is actually exercised.
"""

from __future__ import annotations

import torch

from models.layers.attention import Attention, AttentionMetadata


def round_robin_block_tables(max_seq_lens: list[int], block_size: int) -> list[list[int]]:
    """Blocks ``0..N-1`` dealt out one at a time to the sequences that still need one."""
    needed = [-(-max_len // block_size) for max_len in max_seq_lens]
    tables: list[list[int]] = [[] for _ in max_seq_lens]
    next_block = 0
    for j in range(max(needed)):
        for b, num_blocks in enumerate(needed):
            if j < num_blocks:
                tables[b].append(next_block)
                next_block += 1
    return tables


def build_metadata(
    block_tables: list[list[int]],
    block_size: int,
    seq_lens: list[int],  # context length per sequence, new tokens included
    query_lens: list[int],  # new tokens per sequence (the last ones of its context)
) -> AttentionMetadata:
    """Metadata for a packed step in which sequence ``b`` computes its last ``query_lens[b]`` tokens."""
    slots = [
        table[pos // block_size] * block_size + pos % block_size
        for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens, strict=True)
        for pos in range(seq_len - q_len, seq_len)
    ]
    width = max(len(table) for table in block_tables)
    padded = [table + [-1] * (width - len(table)) for table in block_tables]
    cu_seqlens_q = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(padded, dtype=torch.int32),
        max_seqlen_q=max(query_lens),
        max_seqlen_k=max(seq_lens),
        is_decode=all(q_len == 1 for q_len in query_lens),
        is_plain_prefill=all(q == s for q, s in zip(query_lens, seq_lens, strict=True)),
    )


def step_positions(seq_lens: list[int], query_lens: list[int]) -> torch.Tensor:  # [T] int64
    """Absolute positions of the new tokens, packed like the metadata."""
    ranges = [torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens, strict=True)]
    return torch.cat(ranges).to(torch.int64)


def bind_kv_caches(
    layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype
) -> None:
    """Give each attention layer zeroed caches of shape [num_blocks, block_size, H_kv, D]."""
    for attn in layers:
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.zeros(shape, dtype=dtype)
        attn.v_cache = torch.zeros(shape, dtype=dtype)
