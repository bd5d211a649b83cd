"""Paged attention layer: stores this step's K/V into the cache, and attends through block tables.

The layer owns no policy: which kernels run is the ``AttentionBackend`` the worker chose at start,
and where each token's K/V goes is the ``AttentionMetadata`` the worker built from the step plan.
The model stores before it attends (``store_kv``, or the fused q/k-norm + RoPE + store kernel
where ``fuses_kv_store``); ``forward`` then reads this step's K/V back from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn


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


class KVStore(NamedTuple):
    """Where one layer's new K/V rows go: token ``t`` to slot ``slot_mapping[t]`` of both caches
    (a slot is ``block_id * block_size + offset``; -1 = do not store)."""

    k_cache: torch.Tensor  # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, H_kv, D]
    slot_mapping: torch.Tensor  # [T] int64


class AttentionBackend(Protocol):
    """Writes a step's K/V into the paged cache (``store_kv``) and attends over it (``forward``).

    ``forward`` expects the cache to hold this step's K/V already. An empty cache
    (``k_cache.numel() == 0``, during memory profiling) means nothing was stored: it attends over
    this step's ``k``/``v`` alone (only valid for a plain prefill).
    """

    name: str
    # True: on CUDA the store may run inside the fused q/k-norm + RoPE kernel
    # (``kernels.qk_norm_rope.qk_norm_rope_store_kv``), which writes what ``store_kv`` would.
    fuses_kv_store: bool
    # True: a prefill/mixed step's ``forward`` may be captured in a CUDA graph (no host sync,
    # a grid sized by ``max_seqlen_q`` and the rows alone; padded rows with no query tokens).
    captures_prefill: bool

    def store_kv(
        self,
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,  # [T, H_kv, D]
        kv_store: KVStore,
    ) -> None: ...

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> Tensor:
        """q [T, H_q, D], k and v [T, H_kv, D], the caches [num_blocks, block_size, H_kv, D]
        -> [T, H_q, D]."""
        ...


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

    @property
    def fuses_kv_store(self) -> bool:
        """Whether the store may run inside the fused q/k-norm + RoPE kernel (on CUDA)."""
        return self.backend.fuses_kv_store

    def kv_store(self, meta: AttentionMetadata) -> KVStore | None:
        """Where this step's K/V go in this layer's cache; None with no cache bound yet (memory
        profiling), when nothing is stored."""
        if self.k_cache.numel() == 0:
            return None
        return KVStore(self.k_cache, self.v_cache, meta.slot_mapping)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_store: KVStore) -> None:
        """Write this step's ``k``/``v`` rows (``[T, H_kv, D]``) into the paged cache."""
        self.backend.store_kv(k, v, kv_store)

    def forward(
        self,
        q: torch.Tensor,  # [T, H_q, D]
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,  # [T, H_kv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H_q * D]
        """Attend over the cache, which holds this step's K/V already (see ``kv_store``)."""
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return out.flatten(1)
