"""The attention backends, and the choice between them, made once at worker start.

``TorchRefBackend`` (``torch``): the pure-torch reference on any device; ``store_kvcache_ref``,
then ``paged_attention_ref`` for every kind of step. The ground truth the kernels are tested
against. ``TritonBackend`` (``triton``): nanoserve's kernels; ``store_kvcache`` (which the model
may fuse into its q/k-norm + RoPE kernel on CUDA, ``fuses_kv_store``), then per step
``paged_decode_attention`` when every sequence has one query token, else
``paged_prefill_attention`` (plain and chunked prefill, prefix-cache hits, mixed batches). Both
attend densely over the step's own K/V with ``dense_causal_varlen_ref`` while no cache is bound
(the memory-profiling forward). ``flash-attn``: FlashAttention 4 over the same cache
(worker_service/flash_attn_backend.py). ``PhasedBackend``: one backend for decode steps, another
for the rest ("prefill=flash-attn,decode=triton").

``select_backend`` resolves ``auto``: torch off CUDA; on CUDA, where flash-attn 4 imports, the
backend measured faster for each phase on that architecture (``AUTO_WITH_FLASH_ATTN``), else
Triton. Backend modules are imported when a backend is built; this module imports only
``kernels.store_kvcache`` (for its reference). Nothing compiles at import: Triton (and
FlashAttention's CuTe DSL) compile a kernel at its first launch for each new variant, on CUDA
at worker start (decode while the CUDA graphs are captured) and in the scheduler's warm-up
(prefill), before the service reports SERVING.
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
    captures_prefill = False  # it reads the step's lengths on the host

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
    captures_prefill = True

    def __init__(self, max_context_len: int | None = None, max_num_seqs: int | None = None) -> None:
        """With both limits given, decode splits long contexts by the engine's limits (the
        padded batch size and max_model_len), never by this step's shapes: eager and CUDA-graph
        decode then split alike and give bit-identical results."""
        from kernels.decode_splits import default_num_splits
        from kernels.paged_decode_attention import paged_decode_attention
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


class PhasedBackend:
    """Decode steps to one backend, every other step (prefill, chunked, mixed) to another.

    Both store K/V with the same Triton store into the same cache layout, so either reads what
    the other wrote; the profiling forward (no cache bound) goes to the prefill backend.
    """

    fuses_kv_store = True

    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        self.prefill, self.decode = prefill, decode
        self.captures_prefill = prefill.captures_prefill
        self.name = f"prefill={prefill.name},decode={decode.name}"

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_store: KVStore) -> None:
        self.prefill.store_kv(k, v, kv_store)

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
        backend = self.decode if meta.is_decode and k_cache.numel() else self.prefill
        return backend.forward(q, k, v, k_cache, v_cache, meta, scale)


BACKEND_NAMES = ("auto", "torch", "triton", "flash-attn")
PHASES = ("prefill", "decode")
PHASE_BACKENDS = ("triton", "flash-attn")  # what "prefill=X,decode=Y" may name
# What ``auto`` picks per compute capability (major) where flash-attn 4 imports, as measured
# (docs/attention.md); an architecture not listed gets Triton. On an H200 (9.0)
# flash-attn 4's prefill kernel wins alone at 8k+ tokens, but Triton won both workloads end to
# end with either phase on flash-attn (its per-call host cost, and decode without K/V splits),
# so no architecture picks it yet.
AUTO_WITH_FLASH_ATTN: dict[int, dict[str, str] | str] = {9: "triton"}


def parse_backend(spec: str | None) -> dict[str, str] | str:
    """``spec`` as a backend name (``BACKEND_NAMES``, None = auto) or as
    {"prefill": name, "decode": name} from "prefill=X,decode=Y"; ValueError naming the choices."""
    if spec is None or spec in BACKEND_NAMES:
        return spec or "auto"
    allowed = (
        ", ".join(BACKEND_NAMES)
        + ", or prefill=X,decode=Y with X, Y in "
        + "/".join(PHASE_BACKENDS)
    )
    phases = dict(part.partition("=")[::2] for part in spec.split(","))
    if set(phases) != {"prefill", "decode"} or not set(phases.values()) <= set(PHASE_BACKENDS):
        raise ValueError(f"unknown attention backend {spec!r}; allowed: {allowed}")
    return phases


def check_backend(spec: str | None) -> None:
    """At start, before anything loads: ValueError if ``spec`` is unknown or names flash-attn
    where flash-attn 4 does not import (the message names the package)."""
    from worker_service.flash_attn_backend import import_flash_attn

    choice = parse_backend(spec)
    names = set(choice.values()) if isinstance(choice, dict) else {choice}
    if "flash-attn" in names:
        try:
            import_flash_attn()
        except ImportError as e:
            raise ValueError(str(e)) from e


def auto_backends(device: torch.device) -> dict[str, str] | str:
    """``auto`` resolved: torch off CUDA; on CUDA the table's entry for this architecture
    (Triton if none), Triton too where that entry names flash-attn and ``flash_attn.cute`` does
    not import. An entry of Triton does not import flash-attn at all (its import takes seconds)."""
    from worker_service.flash_attn_backend import flash_attn_available

    if device.type != "cuda":
        return "torch"
    choice = AUTO_WITH_FLASH_ATTN.get(torch.cuda.get_device_capability(device)[0], "triton")
    if choice == "triton" or not flash_attn_available():
        return "triton"
    return choice


def select_backend(
    device: torch.device,
    forced: str | None = None,
    max_context_len: int | None = None,
    max_num_seqs: int | None = None,
) -> AttentionBackend:
    """The attention backend for ``device``; ``forced`` as ``parse_backend`` reads it.

    ``auto`` (or None): see ``auto_backends``. "triton" on CPU needs ``TRITON_INTERPRET=1``
    set before the kernels are first imported; "flash-attn" needs CUDA and the flash-attn-4
    package (ValueError naming it).
    """
    choice = parse_backend(forced)
    if choice == "auto":
        choice = auto_backends(device)
    if isinstance(choice, dict):
        if choice["prefill"] == choice["decode"]:
            choice = choice["prefill"]
        else:
            return PhasedBackend(
                *(_build(choice[p], device, max_context_len, max_num_seqs) for p in PHASES)
            )
    return _build(choice, device, max_context_len, max_num_seqs)


def _build(
    name: str, device: torch.device, max_context_len: int | None, max_num_seqs: int | None
) -> AttentionBackend:
    if name == "torch":
        return TorchRefBackend()
    if name == "flash-attn":
        from worker_service.flash_attn_backend import FlashAttnBackend

        try:
            backend = FlashAttnBackend()
        except ImportError as e:  # the message names the package
            raise ValueError(str(e)) from e
        if device.type != "cuda":
            raise ValueError(f"attention backend 'flash-attn' needs CUDA, not {device.type}")
        return backend
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention backend 'triton' on {device.type} needs TRITON_INTERPRET=1 (the Triton interpreter)"
        )
    return TritonBackend(max_context_len, max_num_seqs)
