"""The flash-attn backend (FlashAttention 4) on the GPU: against ``paged_attention_ref`` at the
shapes the Triton kernels are tested at, whole steps (store, then attend) like the Triton
backend's test, and a decode step captured in a CUDA graph equal to the eager one when replayed
with new lengths and tables. The engine-level checks (bf16 greedy against transformers, graphs ==
eager) run with ``pytest --attention-backend flash-attn`` (tests/gpu/run_all.sh).
Skipped where flash-attn 4 does not import."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from models.layers.attention import KVStore
from tests.kernel_helpers import (
    DEVICE,
    NAN,
    assert_close_rel,
    make_paged_kv,
    make_step_metadata,
)
from worker_service.attention_backends import TorchRefBackend
from worker_service.flash_attn_backend import flash_attn_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn 4 (flash-attn-4)"),
]
DTYPE = torch.bfloat16


def backend():
    from worker_service.flash_attn_backend import FlashAttnBackend

    return FlashAttnBackend()


def check_against_reference(cached_and_new, block_size, num_kv_heads, group, head_dim=128):
    """The backend's output on a step whose context is already in the cache (every slot no
    sequence uses is NaN) against the float32 reference."""
    seq_lens = [c + n for c, n in cached_and_new]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, DTYPE)
    if block_size == 128:  # pages load by TMA, whole tiles: rows past a sequence must be finite
        k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    meta = make_step_metadata(cached_and_new, tables, block_size)
    num_tokens = sum(n for _, n in cached_and_new)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, dtype=DTYPE, device=DEVICE)
    scale = head_dim**-0.5
    out = backend().forward(q, q, q, k_cache, v_cache, meta, scale)
    ref = paged_attention_ref(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens, tables, scale)
    assert out.shape == q.shape
    assert_close_rel(out, ref, DTYPE)


DECODE = [(0, 1), (16, 1), (299, 1), (1023, 1), (4000, 1)]  # a single token; not block multiples
PREFILL = [(0, 1), (0, 37), (300, 200), (255, 257), (17, 513), (1000, 1)]  # mixed and chunked


@pytest.mark.parametrize("block_size", [16, 256, 128], ids=["block16", "block256", "block128-tma"])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(8, 1), (8, 2), (4, 4), (2, 8), (1, 8)])
@pytest.mark.parametrize("steps", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_flash_attn_matches_reference(steps, block_size, num_kv_heads, group) -> None:
    check_against_reference(steps, block_size, num_kv_heads, group)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attn_decode_at_256_sequences(head_dim: int) -> None:
    lens = torch.randint(1, 2049, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    check_against_reference([(n - 1, 1) for n in lens], 256, 8, 2, head_dim)


def test_flash_attn_step_stores_then_attends_like_the_torch_backend() -> None:
    """A chunked-prefill step through store_kv + forward, against the torch backend's."""
    block_size, num_kv_heads, group, head_dim = 16, 2, 4, 128
    cached_and_new = [(20, 7), (0, 18), (33, 1)]
    num_blocks = 16
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_pool = torch.randn(shape, dtype=DTYPE, device=DEVICE)
    v_pool = torch.randn(shape, dtype=DTYPE, device=DEVICE)
    k_pool[8], v_pool[8] = NAN, NAN  # a block no sequence uses
    tables = torch.tensor([[3, 7, -1], [1, 9, -1], [4, 5, 11]], dtype=torch.int32, device=DEVICE)
    meta = make_step_metadata(cached_and_new, tables, block_size)
    num_tokens = len(meta.slot_mapping)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, dtype=DTYPE, device=DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    fa, torch_ref = backend(), TorchRefBackend()
    fa.store_kv(k, v, KVStore(k_pool, v_pool, meta.slot_mapping))
    out = fa.forward(q, k, v, k_pool, v_pool, meta, head_dim**-0.5)
    torch_ref.store_kv(k, v, KVStore(k_ref, v_ref, meta.slot_mapping))
    ref = torch_ref.forward(q, k, v, k_ref, v_ref, meta, head_dim**-0.5)
    assert_close_rel(out, ref, DTYPE)
    torch.testing.assert_close(k_pool, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_pool, v_ref, equal_nan=True, rtol=0, atol=0)


def test_flash_attn_without_cache_attends_densely() -> None:
    """The memory-profiling forward: no cache bound, this step's own K/V."""
    cached_and_new = [(0, 50), (0, 300)]
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    meta = make_step_metadata(cached_and_new, tables, block_size=512)
    q, k, v = (torch.randn(350, 4, 128, dtype=DTYPE, device=DEVICE) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    empty = torch.empty(0, dtype=DTYPE, device=DEVICE)
    out = backend().forward(q, k, v, empty, empty, meta, 0.1)
    from worker_service.attention_backends import dense_causal_varlen_ref

    assert_close_rel(out, dense_causal_varlen_ref(q, k, v, meta.cu_seqlens_q, 0.1), DTYPE)


def test_flash_attn_decode_in_a_cuda_graph_equals_eager_after_new_lengths_and_tables() -> None:
    """Captured once at the engine's static table width, replayed for another step: the same
    numbers as an eager call on that step (nothing read on the host at capture)."""
    num_seqs, width, block_size = 8, 24, 256
    k_cache, v_cache, _ = make_paged_kv([width * block_size] * num_seqs, block_size, 8, 128, DTYPE)
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)  # any block may be used
    num_blocks = k_cache.shape[0]
    gen = torch.Generator().manual_seed(0)

    def random_step():
        lens = torch.randint(1, width * block_size, (num_seqs,), generator=gen)
        tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * width].view(num_seqs, -1)
        q = torch.randn(num_seqs, 16, 128, generator=gen).to(DTYPE)
        return q.to(DEVICE), lens.int().to(DEVICE), tables.int().to(DEVICE)

    fa = backend()
    q, lens, tables = (t.clone() for t in random_step())
    meta = make_step_metadata([(1, 1)] * num_seqs, tables, block_size)
    meta.seq_lens = lens
    fa.forward(q, q, q, k_cache, v_cache, meta, 0.088)  # compile before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa.forward(q, q, q, k_cache, v_cache, meta, 0.088)
    for _ in range(3):
        new_q, new_lens, new_tables = random_step()
        q.copy_(new_q), lens.copy_(new_lens), tables.copy_(new_tables)
        graph.replay()
        eager = fa.forward(q, q, q, k_cache, v_cache, meta, 0.088)
        assert torch.equal(out, eager)
        ref = paged_attention_ref(q, k_cache, v_cache, meta.cu_seqlens_q, lens, tables, 0.088)
        assert_close_rel(out, ref, DTYPE)
