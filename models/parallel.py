"""Tensor-parallel context and every collective the model uses, in one place.

Grep this module's function names to find all communication in the forward pass. At world size 1
each collective is the identity and torch.distributed is never touched, so a single-GPU (or CPU
test) run needs no process group. At world size > 1 they act on the default process group, which
the worker initialises (NCCL on GPU, gloo on CPU) before building the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid rank {self.rank} for world size {self.world_size}")

    @property
    def is_driver(self) -> bool:
        """Rank 0 receives the gathered logits and samples."""
        return self.rank == 0


SINGLE_RANK = ParallelContext(rank=0, world_size=1)  # no tensor parallelism: the default


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum ``x`` over all ranks, in place; every rank gets the sum."""
    if ctx.world_size == 1:
        return x
    dist.all_reduce(x)
    return x


def gather_to_rank0(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor | None:
    """Concatenate every rank's ``x`` (all the same shape) along ``dim`` on rank 0; None elsewhere."""
    if ctx.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)] if ctx.is_driver else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=dim) if parts is not None else None


def broadcast(x: torch.Tensor, ctx: ParallelContext, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s ``x``, in place."""
    if ctx.world_size == 1:
        return x
    dist.broadcast(x, src=src)
    return x
