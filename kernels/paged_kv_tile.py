"""Where a tile of one sequence's keys and values sits in the paged cache: a Triton device helper.

Both paged attention kernels (decode, prefill) read K/V tiles the same way: keys ``n0 .. n0 +
BLOCK_N`` of one sequence map through its block table row to cache blocks, then to rows of the
cache at ``block * stride_cache_block + (token % BLOCK_SIZE) * stride_cache_tok``. Inlined into
its callers when they compile; no launch of its own, so no wrapper or reference here (the kernels'
tests cover it through theirs).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kv_tile_offsets(
    bt_row,  # this sequence's row of the block table
    n0,  # the tile's first key
    end,  # keys at or past this are outside the sequence (masked)
    offs_n,  # tl.arange(0, BLOCK_N)
    offs_d,  # tl.arange(0, HEAD_DIM)
    stride_cache_block,
    stride_cache_tok,
    head_off,  # the KV head's offset in a cache row
    BLOCK_SIZE: tl.constexpr,
    TILE_IN_ONE_BLOCK: tl.constexpr,  # the tile never crosses a cache block: one table read
):
    """The tile's key positions [BLOCK_N], which are inside the sequence, and their cache offsets
    [BLOCK_N, HEAD_DIM]."""
    tok = n0 + offs_n
    tok_mask = tok < end
    if TILE_IN_ONE_BLOCK:
        block = tl.load(bt_row + n0 // BLOCK_SIZE).to(tl.int64)
    else:
        block = tl.load(bt_row + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    row_offs = block * stride_cache_block + (tok % BLOCK_SIZE) * stride_cache_tok + head_off
    return tok, tok_mask, row_offs[:, None] + offs_d[None, :]
