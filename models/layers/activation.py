"""Gated activation used by the Qwen3 MLP: ``silu(gate) * up`` on the fused gate_up output.

On CUDA this is one Triton kernel (``kernels.silu_and_mul``); on CPU it is the torch code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``x: [T, 2I] -> silu(x[:, :I]) * x[:, I:]: [T, I]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2:
            from kernels.silu_and_mul import silu_and_mul  # triton is imported only where it runs

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
