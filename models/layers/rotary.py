"""Rotary position embedding, neox style (rotate-half), numerically matching transformers' Qwen3.

``inv_freq`` is computed on the CPU in float32 exactly as transformers' default rope init does;
cos/sin for every position up to ``max_position_embeddings`` are precomputed in float32 (the same
elementwise operations transformers runs per step) and cast to the query dtype when applied.
Only the "default" rope type exists here; scaled variants are refused by ``ModelConfig``.
On CUDA, Qwen3's attention runs its q/k norms and this RoPE as one Triton kernel
(``kernels.qk_norm_rope``) that reads ``cos_cache``/``sin_cache`` from here.
"""

from __future__ import annotations

import torch
from torch import nn


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:  # [D / 2] float32, on CPU
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    return 1.0 / (base**exponents)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at the given absolute positions."""

    cos_cache: torch.Tensor  # [P, D] float32, a non-persistent buffer
    sin_cache: torch.Tensor  # [P, D] float32

    def __init__(self, head_dim: int, max_position_embeddings: int, base: float) -> None:
        super().__init__()
        inv_freq = default_inv_freq(head_dim, base)
        positions = torch.arange(max_position_embeddings, dtype=torch.float32)  # default device
        freqs = positions[:, None] * inv_freq.to(positions.device)[None, :]  # [P, D / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos_cache", angles.cos(), persistent=False)  # [P, D] float32
        self.register_buffer("sin_cache", angles.sin(), persistent=False)  # [P, D] float32

    def forward(
        self,
        positions: torch.Tensor,  # [T] int64
        q: torch.Tensor,  # [T, H_q, D]
        k: torch.Tensor,  # [T, H_kv, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k
