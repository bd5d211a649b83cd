"""Paged attention layer: stores this step's K/V into the cache, then attends through block tables.

The layer owns no policy: which kernel runs is the ``AttentionBackend`` the worker chose at start,
and where each token's K/V goes is the ``AttentionMetadata`` the worker built from the step plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

# What a fused kernel needs to store a step's K/V itself: (v, k_cache, v_cache, slot_mapping).
KVStore = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class AttentionMetadata:
    """Per-step tensors describing a packed batch of ``B`` sequences and ``T`` new tokens.

    Sequences are packed back to back; sequence ``b`` contributes query tokens
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, which are the last tokens of its context of
    ``seq_lens[b]`` tokens (cached prefix + new tokens).
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token, -1 = skip
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_num_blocks] int32, padded with -1
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool  # every sequence has exactly one query token
    is_plain_prefill: bool  # no sequence has cached context: q, k, v of this step are all there is


class AttentionBackend(Protocol):
    """Stores ``k``/``v`` into the cache by ``meta.slot_mapping`` and returns the attention output.

    An empty cache (``k_cache.numel() == 0``, during memory profiling) means: skip the store and
    attend over this step's ``k``/``v`` alone (only valid for a plain prefill).
    """

    name: str
    # True: the cache may be filled before ``forward`` (by the fused q/k-norm + RoPE kernel),
    # which is then called with ``kv_stored=True`` and skips its own store.
    accepts_stored_kv: bool

    def forward(
        self,
        q: torch.Tensor,  # [T, H_q, D]
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,  # [T, H_kv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
        meta: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,
    ) -> torch.Tensor: ...  # [T, H_q, D]


class Attention(nn.Module):
    """Multi-head (GQA) attention over the paged cache for this rank's heads."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.backend = backend
        # Bound by the worker once the cache is allocated: [num_blocks, block_size, H_kv, D].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def fused_kv_store(self, v: torch.Tensor, meta: AttentionMetadata) -> KVStore | None:
        """What a fused kernel needs to store this step's K/V itself, if the backend allows it:
        ``(v, k_cache, v_cache, slot_mapping)``; None with no cache bound (memory profiling)."""
        if not self.backend.accepts_stored_kv or self.k_cache.numel() == 0:
            return None
        return v, self.k_cache, self.v_cache, meta.slot_mapping

    def forward(
        self,
        q: torch.Tensor,  # [T, H_q, D]
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,  # [T, H_kv, D]
        meta: AttentionMetadata,
        kv_stored: bool = False,  # this step's K/V are already in the cache
    ) -> torch.Tensor:  # [T, H_q * D]
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_stored)
        return out.flatten(1)
