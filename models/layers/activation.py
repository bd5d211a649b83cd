"""Gated activation used by the Qwen3 MLP: ``silu(gate) * up`` on the fused gate_up output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``x: [T, 2I] -> silu(x[:, :I]) * x[:, I:]: [T, I]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
