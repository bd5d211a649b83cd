"""Tensor-parallel linear layers and the weight loaders that shard full checkpoint tensors.

Column-parallel layers split the output features across ranks (no communication); row-parallel
layers split the input features and sum the partial products with one ``all_reduce``. Every
parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``: ``loaded_weight`` is the
FULL checkpoint tensor (a ``torch.Tensor`` or a lazily-read safetensors slice, which supports
``get_shape()`` and basic slicing) and the loader copies only this rank's part into ``param``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.parallel import ParallelContext, all_reduce

ShardId = str | int | None
WEIGHT_LOADER = "weight_loader"  # the attribute of a parameter that holds its loader


class WeightLoader(Protocol):
    """Copies this rank's part of the full checkpoint tensor ``loaded_weight`` into ``param``."""

    def __call__(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
    ) -> None: ...


def skinny_gemm_for(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False
) -> Callable[..., torch.Tensor] | None:
    """``kernels.skinny_gemm.skinny_gemm`` where it takes ``x @ weight.T`` (``gated``: and
    SiLU-and-mul; CUDA, decode batch sizes, a small half-precision weight, no bias: cuBLAS reads
    such weights at a fraction of the copy bandwidth), else None."""
    if bias is None and x.is_cuda:
        from kernels import skinny_gemm  # triton is imported only where it runs

        if skinny_gemm.use_skinny(x, weight, gated):
            return skinny_gemm.skinny_gemm
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, or the skinny GEMM where it takes it (``skinny_gemm_for``)."""
    gemm = skinny_gemm_for(x, weight, bias)
    return F.linear(x, weight, bias) if gemm is None else gemm(x, weight)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    setattr(param, WEIGHT_LOADER, loader)


def weight_loader_of(param: nn.Parameter) -> WeightLoader:
    """The loader the parameter's layer attached; ``default_weight_loader`` when none was."""
    loader: WeightLoader = getattr(param, WEIGHT_LOADER, default_weight_loader)
    return loader


def full_shape(loaded_weight: Any) -> tuple[int, ...]:
    """Shape of a checkpoint tensor or of a lazy safetensors slice."""
    if hasattr(loaded_weight, "get_shape"):
        return tuple(loaded_weight.get_shape())
    return tuple(loaded_weight.shape)


def check_shape(loaded_weight: Any, expected: tuple[int, ...]) -> None:
    """Refuse a checkpoint tensor whose full shape is not what this layer was built for."""
    shape = full_shape(loaded_weight)
    if shape != expected:
        raise ValueError(f"checkpoint tensor has shape {shape}, expected {expected}")


def default_weight_loader(
    param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
) -> None:
    """Replicated parameter: copy the whole tensor."""
    check_shape(loaded_weight, tuple(param.shape))
    param.data.copy_(loaded_weight[:])


def loaded_param(shape: tuple[int, ...], loader: WeightLoader) -> nn.Parameter:
    """An uninitialised frozen parameter of ``shape`` whose checkpoint tensor ``loader`` copies."""
    param = nn.Parameter(torch.empty(shape), requires_grad=False)
    set_weight_loader(param, loader)
    return param


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the world size ({denominator})")
    return numerator // denominator


def copy_rows(param_rows: torch.Tensor, loaded_weight: Any, start: int) -> None:
    """``param_rows[:] = loaded_weight[start : start + len(param_rows)]`` (dim 0)."""
    param_rows.copy_(loaded_weight[start : start + param_rows.shape[0]])


class _ParallelLinear(nn.Module):
    """What every tensor-parallel linear layer knows: its full sizes and its rank's place."""

    def __init__(self, input_size: int, output_size: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.input_size = input_size
        self.output_size = output_size


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's output rows split evenly across ranks; output stays sharded."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, parallel: ParallelContext
    ) -> None:
        super().__init__(input_size, output_size, parallel)
        self.output_size_per_rank = divide(output_size, parallel.world_size, "output size")
        self.weight = loaded_param((self.output_size_per_rank, input_size), self.weight_loader)
        rows = self.output_size_per_rank
        self.bias = loaded_param((rows,), self.weight_loader) if bias else None

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
    ) -> None:
        check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        copy_rows(param.data, loaded_weight, self.parallel.rank * self.output_size_per_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out / world]
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused in one matmul (gate_up); each is sharded separately.

    This rank's output is ``[shard of output 0 | shard of output 1 | ...]``.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool, parallel: ParallelContext
    ) -> None:
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            divide(size, parallel.world_size, "merged output size")
        super().__init__(input_size, sum(output_sizes), bias, parallel)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
    ) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"merged linear needs an integer shard_id, got {shard_id!r}")
        world, size = self.parallel.world_size, self.output_sizes[shard_id]
        check_shape(loaded_weight, (size, *param.shape[1:]))
        offset = sum(self.output_sizes[:shard_id]) // world
        rows = param.data.narrow(0, offset, size // world)
        copy_rows(rows, loaded_weight, self.parallel.rank * (size // world))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; q heads split across ranks, KV heads split or replicated.

    When there are fewer KV heads than ranks, each KV head is replicated on ``world / H_kv``
    consecutive ranks, which are exactly the ranks holding the q heads of its group.
    This rank's output is ``[q: H_q/world * D | k: h_kv * D | v: h_kv * D]``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool,
        parallel: ParallelContext,
    ) -> None:
        world = parallel.world_size
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, world, "number of attention heads")
        if total_num_kv_heads >= world:
            self.num_kv_heads = divide(total_num_kv_heads, world, "number of KV heads")
            self.kv_head_start = parallel.rank * self.num_kv_heads
        else:
            replicas = divide(world, total_num_kv_heads, "KV-head replication: world size")
            self.num_kv_heads = 1
            self.kv_head_start = parallel.rank // replicas
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * world
        super().__init__(hidden_size, output_size, bias, parallel)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
    ) -> None:
        d = self.head_dim
        if shard_id == "q":
            total, offset, size = self.total_num_heads * d, 0, self.q_size
            start = self.parallel.rank * self.q_size
        elif shard_id in ("k", "v"):
            total, size = self.total_num_kv_heads * d, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            start = self.kv_head_start * d
        else:
            raise ValueError(f"QKV linear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        check_shape(loaded_weight, (total, *param.shape[1:]))
        copy_rows(param.data.narrow(0, offset, size), loaded_weight, start)


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's input columns split across ranks; partial sums are all-reduced.

    The input is expected already sharded (the output of a column-parallel layer). Only rank 0
    adds the bias, so the sum contains it once.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool, parallel: ParallelContext
    ) -> None:
        super().__init__(input_size, output_size, parallel)
        self.input_size_per_rank = divide(input_size, parallel.world_size, "input size")
        self.weight = loaded_param((output_size, self.input_size_per_rank), self.weight_loader)
        self.bias = loaded_param((output_size,), default_weight_loader) if bias else None

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
    ) -> None:
        check_shape(loaded_weight, (self.output_size, self.input_size))
        start = self.parallel.rank * self.input_size_per_rank
        param.data.copy_(loaded_weight[:, start : start + self.input_size_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in / world] -> [T, out]
        bias = self.bias if self.parallel.is_driver else None  # added once, by rank 0
        return all_reduce(linear(x, self.weight, bias), self.parallel)
