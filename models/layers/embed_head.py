"""Vocabulary-parallel token embedding and LM head.

The embedding takes a step's ids as the worker has them: some may still be on the device, sampled
by the previous step (``prev_rows[t] >= 0``: token ``t`` is ``prev_tokens[prev_rows[t]]``). On one
CUDA rank the ids are resolved and looked up in one kernel (kernels/embed_tokens.py).

The vocabulary is split into ``world_size`` equal row ranges (the last one padded with zero rows
when the vocabulary does not divide evenly). The embedding looks up only this rank's range and
all-reduces; the head computes logits for this rank's range and gathers them to rank 0, which is
the only rank that samples. Tied checkpoints share one weight between the two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.linear import ShardId, check_shape, set_weight_loader
from models.parallel import ParallelContext, all_reduce, gather_to_rank0


class VocabParallelEmbedding(nn.Module):
    """``embed[ids]`` with the vocabulary rows split across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_size_per_rank = -(-vocab_size // parallel.world_size)  # ceil
        self.vocab_start = parallel.rank * self.vocab_size_per_rank
        self.vocab_end = min(self.vocab_start + self.vocab_size_per_rank, vocab_size)
        self.weight = nn.Parameter(
            torch.empty(self.vocab_size_per_rank, hidden_size), requires_grad=False
        )
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: Any, shard_id: ShardId = None
    ) -> None:
        check_shape(loaded_weight, (self.vocab_size, self.hidden_size))
        num_rows = max(self.vocab_end - self.vocab_start, 0)
        param.data[num_rows:].zero_()  # padding rows of the last rank
        if num_rows:
            param.data[:num_rows].copy_(loaded_weight[self.vocab_start : self.vocab_end])

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        prev_rows: torch.Tensor | None = None,  # [T] int64, -1: the id is in input_ids
        prev_tokens: torch.Tensor | None = None,  # [R] int64, the previous step's tokens
    ) -> torch.Tensor:  # [T, hidden]
        single = self.parallel.world_size == 1
        if single and self.weight.is_cuda:
            from kernels.embed_tokens import embed_tokens  # triton only where it runs

            return embed_tokens(self.weight, input_ids, prev_rows, prev_tokens)
        if prev_rows is not None:
            assert prev_tokens is not None
            input_ids = torch.where(prev_rows >= 0, prev_tokens[prev_rows.clamp(min=0)], input_ids)
        if single:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(~in_range, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(~in_range.unsqueeze(-1), 0.0)
        return all_reduce(out, self.parallel)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary range, gathered to rank 0."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [B, hidden] -> local: [B, V / world] -> rank 0: [B, V], in the model's dtype
        # (the samplers read half-precision logits directly: no float32 copy of [B, V])
        local = F.linear(hidden, self.weight)
        logits = gather_to_rank0(local, self.parallel, dim=-1)
        if logits is None:
            return None
        return logits[:, : self.vocab_size]
