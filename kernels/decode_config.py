"""The decode attention's launch shape (K/V rows per tile, warps, software-pipelining depth),
chosen from shapes only, like its split count (``decode_splits``), so a CUDA graph's bucket
always launches the same variant."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters: K/V rows per tile, warps per program, software-pipelining depth.

    The default was the fastest of a sweep on an H100 (256 seqs x 1024 tokens, Qwen3-0.6B heads,
    bf16): 97% of device copy bandwidth; most configurations there were within 3% of it. Many
    sequences take ``WIDE_TILE`` where it fits (``default_decode_config``).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


# From 64 sequences on, 128-row K/V tiles (three stages: 192 KB of shared memory, one program
# per SM) read mixed-length contexts 2-3.5 points closer to the copy bandwidth than 64-row ones
# (H200, `python bench/kernel_bench.py --sweep`); fewer sequences keep the 64-row tiles, whose
# short splits keep a single user's step short.
WIDE_TILE_MIN_SEQS = 64
WIDE_TILE = DecodeConfig(block_n=128)


def _shared_memory_bytes(config: DecodeConfig, head_dim: int, element_size: int) -> int:
    return 2 * config.num_stages * config.block_n * head_dim * element_size  # K and V tiles


def default_decode_config(
    head_dim: int, element_size: int = 2, num_seqs: int = 1, shared_memory: int = 0
) -> DecodeConfig:
    """The swept defaults: 128-row tiles from ``WIDE_TILE_MIN_SEQS`` sequences where a program
    may have that much shared memory (``shared_memory``: the device's per-program limit in
    bytes; 0 on CPU), else 64-row tiles at half-precision D <= 128, else smaller tiles."""
    if head_dim * element_size > 256:
        return DecodeConfig(block_n=32, num_stages=2)
    wide_fits = _shared_memory_bytes(WIDE_TILE, head_dim, element_size) < shared_memory
    return WIDE_TILE if num_seqs >= WIDE_TILE_MIN_SEQS and wide_fits else DecodeConfig()


@functools.cache
def max_shared_memory(device_index: int) -> int:
    """Bytes of shared memory one program may have on this device (its opt-in limit)."""
    properties = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(properties["max_shared_mem"])
