"""The two attention backends, and the choice between them, made once at worker start.

``TorchRefBackend`` (``torch``): the pure-torch reference on any device; ``store_kvcache_ref``,
then ``paged_attention_ref`` for every kind of step. The ground truth the kernels are tested
against. ``TritonBackend`` (``triton``): nanoserve's kernels; ``store_kvcache`` (which the model
may fuse into its q/k-norm + RoPE kernel on CUDA, ``fuses_kv_store``), then per step
``paged_decode_attention`` when every sequence has one query token, else
``paged_prefill_attention`` (plain and chunked prefill, prefix-cache hits, mixed batches). Both
attend densely over the step's own K/V with ``dense_causal_varlen_ref`` while no cache is bound
(the memory-profiling forward). There is no flash-attn backend.

``select_backend`` resolves ``auto`` by device only: ``triton`` on CUDA, ``torch`` elsewhere; the
phase of a step picks the kernel inside the Triton backend, never the backend. The Triton
attention kernels' modules are imported when a ``TritonBackend`` is built; this module imports
only ``kernels.store_kvcache`` (for its reference). Nothing compiles at import: Triton compiles a
kernel at its first launch for each new dtype and specialization, on CUDA mostly at worker start
(the decode kernel and the fused store while the decode CUDA graphs are captured; the prefill
kernel, which the profiling forward does not reach, at the first prefill step).
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_attention_ref
from kernels.store_kvcache import store_kvcache_ref
from models.layers.attention import AttentionBackend, AttentionMetadata, KVStore
from worker_service.cuda_graphs import batch_buckets


def dense_causal_varlen_ref(
    q: torch.Tensor,  # [T, H_q, D]
    k: torch.Tensor,  # [T, H_kv, D]
    v: torch.Tensor,  # [T, H_kv, D]
    cu_seqlens: torch.Tensor,  # [B + 1]
    scale: float,
) -> torch.Tensor:  # [T, H_q, D]
    """Causal attention of each packed sequence over itself, without any cache."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for start, end in itertools.pairwise(cu):
        qb = q[start:end].transpose(0, 1)  # [H_q, L, D]
        kb = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        out[start:end] = ob.transpose(0, 1)
    return out


class TorchRefBackend:
    """Pure torch: runs on any device, slowly. The reference the kernels are tested against."""

    name = "torch"
    fuses_kv_store = False  # the reference stores with its own reference function

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_store: KVStore) -> None:
        store_kvcache_ref(k, v, *kv_store)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if k_cache.numel() == 0:
            return dense_causal_varlen_ref(q, k, v, meta.cu_seqlens_q, scale)
        return paged_attention_ref(
            q,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.block_tables,
            scale,
        )


class TritonBackend:
    """nanoserve's Triton kernels: K/V store, then paged decode or paged prefill attention.

    Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (slowly: for tests only).
    """

    name = "triton"
    fuses_kv_store = True

    def __init__(self, max_context_len: int | None = None, max_num_seqs: int | None = None) -> None:
        """With both limits given, decode splits long contexts by the engine's limits (the
        padded batch size and max_model_len), never by this step's shapes: eager and CUDA-graph
        decode then split alike and give bit-identical results."""
        from kernels.paged_decode_attention import default_num_splits, paged_decode_attention
        from kernels.paged_prefill_attention import paged_prefill_attention
        from kernels.store_kvcache import store_kvcache

        self._store_kvcache = store_kvcache
        self._decode = paged_decode_attention
        self._prefill = paged_prefill_attention
        self._default_num_splits = default_num_splits
        self._max_context_len = max_context_len
        self._buckets = batch_buckets(max_num_seqs) if max_num_seqs else None

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_store: KVStore) -> None:
        self._store_kvcache(k, v, *kv_store)

    def _decode_splits(self, num_seqs: int, num_kv_heads: int, device: torch.device) -> int | None:
        if self._max_context_len is None or self._buckets is None:
            return None  # the kernel decides from the shapes it is given
        padded = next((b for b in self._buckets if b >= num_seqs), num_seqs)
        return self._default_num_splits(padded, num_kv_heads, self._max_context_len, device)

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
        if k_cache.numel() == 0:
            return dense_causal_varlen_ref(q, k, v, meta.cu_seqlens_q, scale)
        if meta.is_decode:
            splits = self._decode_splits(q.shape[0], k_cache.shape[2], q.device)
            return self._decode(
                q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, num_splits=splits
            )
        return self._prefill(
            q,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.block_tables,
            meta.max_seqlen_q,
            scale,
        )


BACKEND_NAMES = ("auto", "torch", "triton")


def select_backend(
    device: torch.device,
    forced: str | None = None,
    max_context_len: int | None = None,
    max_num_seqs: int | None = None,
) -> AttentionBackend:
    """Pick the attention backend for ``device``; ``forced`` names one of ``BACKEND_NAMES``.

    ``auto`` (or None): Triton on CUDA, torch elsewhere. "flash-attn" is refused with a message
    of its own: there is no such backend. "triton" on CPU needs ``TRITON_INTERPRET=1`` set before
    the kernels are first imported.
    """
    if forced not in (None, *BACKEND_NAMES):
        if forced == "flash-attn":
            raise ValueError(
                "attention backend 'flash-attn' is not implemented yet; use one of "
                + ", ".join(BACKEND_NAMES)
            )
        raise ValueError(
            f"unknown attention backend {forced!r}; allowed: {', '.join(BACKEND_NAMES)}"
        )
    name = (
        forced if forced not in (None, "auto") else ("triton" if device.type == "cuda" else "torch")
    )
    if name == "torch":
        return TorchRefBackend()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention backend 'triton' on {device.type} needs TRITON_INTERPRET=1 (the Triton interpreter)"
        )
    return TritonBackend(max_context_len, max_num_seqs)
