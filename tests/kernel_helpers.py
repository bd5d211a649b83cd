"""Shared helpers for the kernel tests: relative-error checks and random paged KV caches.

Imported by the kernel test modules. On CPU the kernels run in the Triton interpreter, which
tests/conftest.py switches on (TRITON_INTERPRET=1) before triton is first imported.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl  # noqa: E402

from models.layers.attention import AttentionMetadata  # noqa: E402

if not ON_GPU and type(tl.cdiv).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "triton was imported in compiled mode before this module could set TRITON_INTERPRET=1; "
        "run the CPU tests with TRITON_INTERPRET=1 in the environment (as `make test` does)"
    )


DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NAN = float("nan")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
# Relative norm error allowed per input dtype. On the GPU a float32 tl.dot runs in tf32 (10-bit
# mantissa) in both products, Q K^T and P V: about 1e-3 was seen on an H100. fp16 and bf16 also
# round the softmax probabilities to the input dtype before the P V product.
TOLERANCE = {torch.float32: 3e-3 if ON_GPU else 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element written and finite; ||out - ref|| / ||ref|| within the dtype's tolerance."""
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not finite"
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err.item() < TOLERANCE[dtype], f"relative error {err.item():.2e}"


def make_paged_kv(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V for each sequence's context in shuffled blocks; every other slot is NaN.

    Returns ``k_cache``, ``v_cache`` [num_blocks, block_size, H_kv, D] and ``block_tables``
    [B, max_blocks + 1] int32 (one extra column of -1 padding).
    """
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype, device=device)
    v_cache = torch.full(shape, NAN, dtype=dtype, device=device)
    block_tables = torch.full(
        (len(seq_lens), max(blocks_per_seq, default=0) + 1), -1, dtype=torch.int32
    )
    order = torch.randperm(num_blocks)
    used = 0
    for b, (seq_len, num_seq_blocks) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        block_ids = order[used : used + num_seq_blocks]
        used += num_seq_blocks
        block_tables[b, :num_seq_blocks] = block_ids.int()
        slots = (block_ids[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
        slots = slots.to(device)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            seq_len, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(
            seq_len, num_kv_heads, head_dim, dtype=dtype, device=device
        )
    return k_cache, v_cache, block_tables.to(device)


def seq_lens_tensor(seq_lens: list[int]) -> torch.Tensor:
    return torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def cu_seqlens(q_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE)


def make_step_metadata(
    cached_and_new: list[tuple[int, int]], block_tables: torch.Tensor, block_size: int
) -> AttentionMetadata:
    """Metadata of one step in which each sequence computes ``new`` tokens after ``cached``."""
    seq_lens = [cached + new for cached, new in cached_and_new]
    q_lens = [new for _, new in cached_and_new]
    slots = []
    for b, (cached, new) in enumerate(cached_and_new):
        for pos in range(cached, cached + new):
            slots.append(int(block_tables[b, pos // block_size]) * block_size + pos % block_size)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        cu_seqlens_q=cu_seqlens(q_lens),
        seq_lens=seq_lens_tensor(seq_lens),
        block_tables=block_tables,
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens),
        is_plain_prefill=all(c == 0 for c, _ in cached_and_new),
    )
