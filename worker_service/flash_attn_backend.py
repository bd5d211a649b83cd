"""The flash-attn backend: FlashAttention 4 (``flash_attn.cute``, package ``flash-attn-4``) over
nanoserve's paged KV cache.

The cache layout is FlashAttention's own paged layout: K and V ``[num_blocks, block_size, H_kv,
D]``, a block table row per sequence as its ``page_table``, the context lengths as ``seqused_k``.
K/V are stored by nanoserve's Triton store (or the fused q/k-norm + RoPE + store kernel): this
backend only attends. One call serves every kind of step:

- decode: one query per sequence, the batch form ``q [B, 1, H_q, D]``;
- prefill, chunked prefill, prefix-cache hits and mixed steps: varlen queries (``cu_seqlens_q``)
  over the paged context, causal with FlashAttention's bottom-right alignment, which is the
  query offset of a sequence whose first tokens are cached.

Nothing here syncs with the host: the page table's width (the engine's static one in a CUDA
graph) bounds the context, so a decode graph captured once replays for every length. FlashAttention
compiles one kernel per variant at its first call (CuTe DSL, seconds each): decode while the
worker captures its graphs, prefill in the scheduler's warm-up, both before readiness.
The package is imported when the backend is built, never at module import.
"""

from __future__ import annotations

from typing import Any

import torch

from models.layers.attention import AttentionMetadata, KVStore

PACKAGE = "flash-attn-4"  # the PyPI name; its module is flash_attn.cute


def import_flash_attn() -> Any:
    """``flash_attn.cute.flash_attn_varlen_func``; ImportError naming the package to install."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError as e:  # the package, or one of its CuTe DSL dependencies, is missing
        raise ImportError(
            f"attention backend 'flash-attn' needs the {PACKAGE} package "
            f"(`pip install {PACKAGE}`, CUDA only): {e}"
        ) from e
    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    """Whether ``flash_attn.cute`` imports here (its CuTe DSL runtime included)."""
    try:
        import_flash_attn()
    except ImportError:
        return False
    return True


class FlashAttnBackend:
    """FlashAttention 4 over the paged cache; K/V stored by nanoserve's Triton store."""

    name = "flash-attn"
    fuses_kv_store = True
    captures_prefill = False  # its varlen prefill has not been checked inside a graph

    def __init__(self) -> None:
        from kernels.store_kvcache import store_kvcache

        self._attend = import_flash_attn()
        self._store_kvcache = store_kvcache

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_store: KVStore) -> None:
        self._store_kvcache(k, v, *kv_store)

    def forward(
        self,
        q: torch.Tensor,  # [T, H_q, D]
        k: torch.Tensor,  # [T, H_kv, D]
        v: torch.Tensor,  # [T, H_kv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, H_kv, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H_q, D]
        if k_cache.numel() == 0:  # memory profiling: this step's own K/V, no cache
            out, _ = self._attend(
                q, k, v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_q,
                max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_q,
                softmax_scale=scale, causal=True,
            )  # fmt: skip
            return out
        if meta.is_decode:
            out, _ = self._attend(
                q.unsqueeze(1), k_cache, v_cache, seqused_k=meta.seq_lens,
                page_table=meta.block_tables, softmax_scale=scale, causal=True,
            )  # fmt: skip
            return out.squeeze(1)
        out, _ = self._attend(
            q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q, max_seqlen_q=meta.max_seqlen_q,
            seqused_k=meta.seq_lens, page_table=meta.block_tables, softmax_scale=scale,
            causal=True,
        )  # fmt: skip
        return out
