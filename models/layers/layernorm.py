"""RMSNorm with an optional fused residual add, numerically identical to transformers' Qwen3RMSNorm.

Normalisation runs in float32; the result is cast back to the input dtype before the weight
multiply, exactly as transformers does, so float32 and bfloat16 outputs match it bit for bit on the
same device. On CUDA, 2-D inputs go through the fused Triton kernel (``kernels.rms_norm``), which
rounds at the same points; the CPU path is the torch code and never touches Triton.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension (replicated on every rank)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        if x.is_cuda and x.dim() == 2:
            from kernels.rms_norm import rms_norm  # triton is imported only where it runs

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
