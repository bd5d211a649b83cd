"""The Triton KV-cache kernels compute what their torch references compute.

Every case draws fresh random inputs, fills the unused parts of the cache and the output with NaN
(so a read outside a sequence's context, or an output row never written, fails), and compares
with the reference by relative norm error. On CPU the kernels run in the Triton interpreter at tiny
shapes; ``@pytest.mark.gpu`` cases run at real shapes (head_dim 128, bf16) and are skipped without
CUDA. The timing test prints, never asserts.
"""

from __future__ import annotations

import pytest
import torch

from kernels import paged_decode_attention as decode_mod
from kernels import paged_prefill_attention as prefill_mod
from kernels import store_kvcache as store_mod
from kernels.paged_decode_attention import DecodeConfig
from kernels.paged_prefill_attention import PrefillConfig
from tests.kernel_helpers import (
    DEVICE,
    NAN,
    assert_close_rel,
    cu_seqlens,
    gpu_only,
    make_paged_kv,
    seq_lens_tensor,
)

# ---------------------------------------------------------------- store_kvcache


def run_store_case(
    num_tokens: int,
    slots: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
) -> None:
    num_blocks = max(slots) // block_size + 2  # one block never written
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=cache_dtype, device=DEVICE)
    v_cache = torch.full(shape, NAN, dtype=cache_dtype, device=DEVICE)
    # k and v as strided views of one fused [T, 3, H_kv, D] projection output, like q/k/v.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_mod.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    store_mod.store_kvcache_ref(k, v, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("slots", "block_size", "num_kv_heads", "head_dim", "dtype", "cache_dtype"),
    [
        ([3, -1, 17, 40, -1, 63, 0], 16, 2, 16, torch.float32, torch.float32),
        ([5], 32, 1, 32, torch.float16, torch.float16),
        ([-1, 100, 2, -1], 32, 3, 16, torch.float32, torch.float16),
    ],
    ids=["skips-padding-slots", "single-token", "casts-to-cache-dtype"],
)
def test_store_kvcache_writes_exactly_the_mapped_slots(
    slots: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
) -> None:
    run_store_case(len(slots), slots, block_size, num_kv_heads, head_dim, dtype, cache_dtype)


def test_store_kvcache_rejects_mismatched_inputs() -> None:
    k = torch.randn(3, 2, 16, device=DEVICE)
    cache = torch.zeros(2, 16, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="cache rows"):
        store_mod.store_kvcache(k, k, cache[:, :, :1], cache[:, :, :1], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_mod.store_kvcache(k, k, cache, cache, slots[:2])
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(2, 16, 2, 32, device=DEVICE)[..., :16]
        store_mod.store_kvcache(k, k, strided, strided, slots)


# ---------------------------------------------------------------- paged decode


def run_decode_case(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    num_splits: int | None,
    config: DecodeConfig | None = None,
) -> None:
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, dtype
    )
    lens = seq_lens_tensor(seq_lens)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, NAN)
    decode_mod.paged_decode_attention(
        q, k_cache, v_cache, lens, block_tables, scale, num_splits, out=out, config=config
    )
    ref = decode_mod.paged_decode_attention_ref(q, k_cache, v_cache, lens, block_tables, scale)
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize(
    ("seq_lens", "block_size", "num_kv_heads", "group", "num_splits", "block_n", "dtype"),
    [
        ([1, 17, 40], 16, 2, 1, None, 16, torch.float32),
        ([33, 5, 16], 16, 2, 2, 3, 32, torch.float32),
        ([70, 1], 32, 1, 4, 2, 16, torch.float32),
        ([1, 48, 23], 16, 1, 8, 4, 16, torch.float16),
        ([45], 32, 2, 3, 1, 32, torch.float32),
    ],
    ids=["mha", "gqa2-split3-tile-spans-blocks", "gqa4-one-kv-head", "gqa8-empty-splits", "gqa3"],
)
def test_paged_decode_matches_reference(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    group: int,
    num_splits: int | None,
    block_n: int,
    dtype: torch.dtype,
) -> None:
    config = DecodeConfig(block_n=block_n)
    run_decode_case(seq_lens, block_size, num_kv_heads, group, 16, dtype, num_splits, config)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_decode_of_empty_padding_sequence_is_zero(num_splits: int) -> None:
    k_cache, v_cache, block_tables = make_paged_kv([0, 9], 16, 1, 16, torch.float32)
    q = torch.randn(2, 2, 16, device=DEVICE)
    out = decode_mod.paged_decode_attention(
        q, k_cache, v_cache, seq_lens_tensor([0, 9]), block_tables, 0.25, num_splits
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out[1]).all()


# ---------------------------------------------------------------- paged prefill


def run_prefill_case(
    cached_and_new: list[tuple[int, int]],
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    config: PrefillConfig | None = None,
) -> None:
    """``cached_and_new``: per sequence, (cached prefix length, new query tokens)."""
    seq_lens = [cached + new for cached, new in cached_and_new]
    q_lens = [new for _, new in cached_and_new]
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, dtype
    )
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    args = (q, k_cache, v_cache, cu_seqlens(q_lens), seq_lens_tensor(seq_lens), block_tables)
    scale = head_dim**-0.5
    out = torch.full_like(q, NAN)
    prefill_mod.paged_prefill_attention(*args, max(q_lens), scale, out=out, config=config)
    ref = prefill_mod.paged_prefill_attention_ref(*args, max(q_lens), scale)
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize(
    ("cached_and_new", "block_size", "num_kv_heads", "group", "block_n", "dtype"),
    [
        ([(0, 5), (20, 1), (13, 19)], 16, 2, 1, 16, torch.float32),
        ([(0, 37), (31, 9)], 32, 1, 2, 16, torch.float32),
        ([(16, 16), (3, 30)], 16, 2, 4, 32, torch.float32),
        ([(0, 20), (47, 3)], 16, 1, 8, 16, torch.float16),
        ([(10, 12)], 32, 2, 3, 16, torch.float32),
    ],
    ids=["mha", "gqa2-one-kv-head", "gqa4-tile-spans-blocks", "gqa8", "gqa3"],
)
def test_paged_prefill_with_cached_prefix_matches_reference(
    cached_and_new: list[tuple[int, int]],
    block_size: int,
    num_kv_heads: int,
    group: int,
    block_n: int,
    dtype: torch.dtype,
) -> None:
    config = PrefillConfig(block_m=max(16, 2 * group), block_n=block_n)
    run_prefill_case(cached_and_new, block_size, num_kv_heads, group, 16, dtype, config)


def test_paged_prefill_numbers_tiles_across_the_step() -> None:
    """A mixed step: one-token rows around two prompts longer than a tile, a row with no tokens
    in the middle and two at the end (a graph's padding). The grid is the step's tokens in tiles
    plus one per row, not rows x the longest prompt's tiles; a program that took the wrong
    sequence or tile leaves NaN rows or attends over the wrong context."""
    cached_and_new = [(0, 1)] * 5 + [(7, 40), (12, 1), (5, 0), (0, 23)] + [(3, 1)] * 3
    cached_and_new += [(1, 0), (1, 0)]
    config = PrefillConfig(block_m=16, block_n=16)  # 8 tokens x 2 heads a tile
    run_prefill_case(cached_and_new, 16, 2, 2, 16, torch.float32, config)


# ---------------------------------------------------------------- GPU, real shapes

QWEN3_06B = {"num_kv_heads": 8, "group": 2, "head_dim": 128}


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("block_size", [256, 16])
def test_store_kvcache_at_real_shapes(block_size: int) -> None:
    num_blocks = 8192 // block_size
    slots = torch.randperm(num_blocks * block_size)[:4096]
    slots[::7] = -1
    run_store_case(4096, slots.tolist(), block_size, 8, 128, torch.bfloat16, torch.bfloat16)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("block_size", [256, 16])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_paged_decode_at_real_shapes(block_size: int, num_splits: int | None) -> None:
    seq_lens = torch.randint(1, 1025, (256,)).tolist()
    seq_lens[0] = 1024
    run_decode_case(seq_lens, block_size, **QWEN3_06B, dtype=torch.bfloat16, num_splits=num_splits)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("group", [2, 4])
def test_paged_decode_splits_long_contexts_of_few_sequences(group: int) -> None:
    run_decode_case([3000, 77], 256, 8, group, 128, torch.bfloat16, num_splits=None)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("block_size", [256, 16])
@pytest.mark.parametrize("group", [2, 4])
def test_paged_prefill_at_real_shapes(block_size: int, group: int) -> None:
    cached_and_new = [(0, 1024), (300, 200), (1000, 1), (17, 513), (256, 256)]
    run_prefill_case(cached_and_new, block_size, 8, group, 128, torch.bfloat16)


def measure_copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read plus bytes written per second."""
    import triton.testing

    src = torch.empty(num_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)


@pytest.mark.gpu
@gpu_only
def test_paged_decode_bandwidth_at_256_seqs_by_1024_tokens() -> None:
    import triton.testing

    num_seqs, context, block_size = 256, 1024, 256
    k_cache, v_cache, block_tables = make_paged_kv(
        [context] * num_seqs, block_size, 8, 128, torch.bfloat16
    )
    q = torch.randn(num_seqs, 16, 128, dtype=torch.bfloat16, device=DEVICE)
    lens = seq_lens_tensor([context] * num_seqs)
    ms = triton.testing.do_bench(
        lambda: decode_mod.paged_decode_attention(q, k_cache, v_cache, lens, block_tables, 0.1),
        return_mode="median",
    )
    kv_bytes = 2 * num_seqs * context * 8 * 128 * 2
    achieved, copy = kv_bytes / (ms * 1e-3), measure_copy_bandwidth()
    print(
        f"\npaged decode {num_seqs}x{context}: {ms * 1e3:.1f} us, {achieved / 1e9:.0f} GB/s "
        f"= {achieved / copy:.0%} of copy bandwidth ({copy / 1e9:.0f} GB/s)"
    )
