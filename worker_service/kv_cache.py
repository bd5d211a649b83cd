"""The paged KV cache: one tensor of fixed-size blocks, sized once, bound to every attention layer.

Layout: ``[2, num_layers, num_blocks, block_size, H_kv, D]`` (K then V). The scheduler decides
which block each token goes to; this module only owns the memory.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig
from models.qwen3 import Qwen3ForCausalLM


def num_kv_heads_per_rank(config: ModelConfig, world_size: int) -> int:
    """KV heads split across ranks, or replicated when there are fewer heads than ranks."""
    return max(1, config.num_key_value_heads // world_size)


def bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, world_size: int
) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    heads = num_kv_heads_per_rank(config, world_size)
    return 2 * config.num_hidden_layers * block_size * heads * config.head_dim * elem


def allocate_kv_cache(
    model: Qwen3ForCausalLM,
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    world_size: int,
) -> torch.Tensor:  # [2, L, num_blocks, block_size, H_kv, D]
    heads = num_kv_heads_per_rank(config, world_size)
    shape = (
        2,
        config.num_hidden_layers,
        num_blocks,
        block_size,
        heads,
        config.head_dim,
    )
    cache = torch.zeros(shape, dtype=dtype, device=device)
    for layer, attn in enumerate(model.attention_layers()):
        attn.k_cache = cache[0, layer]
        attn.v_cache = cache[1, layer]
    return cache
