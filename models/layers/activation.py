"""Gated activation used by the Qwen3 MLP: ``silu(gate) * up`` on the fused gate_up output.

On CUDA this is one Triton kernel (``kernels.silu_and_mul``); on CPU it is the torch code. At
decode batch sizes ``linear_silu_and_mul`` folds it into the gate_up projection's GEMM
(``kernels.skinny_gemm``, gated): one kernel fewer per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.linear import linear, skinny_gemm_for


class SiluAndMul(nn.Module):
    """``x: [T, 2I] -> silu(x[:, :I]) * x[:, I:]: [T, I]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2:
            from kernels.silu_and_mul import silu_and_mul  # triton is imported only where it runs

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def linear_silu_and_mul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``SiluAndMul()(linear(x, weight, bias))``: ``x: [T, in]``, ``weight: [2I, in]`` (gate rows
    then up rows) -> ``[T, I]``; where linear would take the skinny GEMM, one gated kernel."""
    gemm = skinny_gemm_for(x, weight, bias, gated=True)
    if gemm is not None:
        return gemm(x, weight, gated=True)
    return SiluAndMul()(linear(x, weight, bias))
