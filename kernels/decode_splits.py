"""How many programs share one sequence's context in decode attention (flash-decoding), and which
tokens each takes.

``default_num_splits`` is the policy, from shapes only (stable under CUDA-graph capture);
``split_range`` is the tokens of one split (the attention's), ``splits_with_tokens`` how many
splits are not empty (the combine reads only those): both from one formula.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MIN_TOKENS_PER_SPLIT = 256
MAX_NUM_SPLITS = 32
PROGRAMS_PER_SM = 6


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(
    batch_size: int, num_kv_heads: int, max_context_len: int, device: torch.device
) -> int:
    """Splits per (sequence, KV head) so the grid has about ``PROGRAMS_PER_SM`` programs per SM
    (enough loads in flight to reach memory bandwidth). From a sweep on an H200 over mixed context
    lengths, longest first as the engine orders a step, each call replayed in a CUDA graph
    (``python bench/kernel_bench.py --sweep-splits``): one split from 160 sequences (104-107% of
    the copy bandwidth, against 103% with two), two at 64-128, four at 32. 6 programs per SM
    takes 1 split from 99 sequences, 2 from 50, 4 from 25 (at 96 sequences one split read 80%
    against 99% with two, yet 8 programs per SM, two splits up to 132, ran nano_bench_256 no
    faster: 4.895 s of device time against 4.893-4.897). With 12 (taken when the grid ran
    sequences fastest) that pass ran 0.5-0.7% slower, its steps of 129-192 sequences 1.7%.
    Depends only on shapes (``max_context_len`` is the block table's capacity, not the real
    lengths): stable under CUDA-graph capture. On CPU (interpreter): 1."""
    if device.type != "cuda":
        return 1
    num_programs = batch_size * num_kv_heads
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    target = PROGRAMS_PER_SM * _num_sms(device_index)
    by_occupancy = triton.cdiv(target, max(num_programs, 1))
    by_length = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_NUM_SPLITS))


@triton.jit
def split_range(seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first token, tokens per split) of split ``split``: the context in whole ``BLOCK_N``
    tiles, as evenly as they go; the last splits of a short context are empty (first token >=
    seq_len), and a context of ``seq_len`` tokens has ``cdiv(seq_len, tokens per split)``
    splits that are not."""
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return split * tokens_per_split, tokens_per_split


@triton.jit
def splits_with_tokens(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """How many of ``split_range``'s splits of a ``seq_len``-token context hold tokens (0 for an
    empty padding sequence): the first ones."""
    _, tokens_per_split = split_range(seq_len, 0, NUM_SPLITS, BLOCK_N)
    return tl.cdiv(seq_len, tl.maximum(tokens_per_split, 1))
