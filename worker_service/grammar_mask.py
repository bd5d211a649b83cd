"""The grammar mask of a step: which tokens each constrained row may sample, applied to logits.

``build_grammar_mask`` asks each constrained row's matcher (worker_service/grammars.py) for its
next-token bitmask, on the host: bit ``t % 32`` of word ``t // 32`` set = token t allowed, as
xgrammar lays it out. ``apply_grammar_mask`` sets every other logit of those rows to -inf, in
torch (CPU and CUDA alike; xgrammar's own ``apply_token_bitmask_inplace`` is the tests'
reference). Only steps with constrained rows build one, so other steps pay nothing. The
sequences' newest tokens must be known when it is built (model_runner.py reads them first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from worker_service.grammars import GrammarCache
from worker_service.sequence_table import WorkerSequence

A = TypeVar("A")  # the host's tensors, then the device's
BITS = 32


@dataclass(frozen=True)
class GrammarMask(Generic[A]):
    rows: A  # [R] int64: the sampling rows that are constrained
    bitmask: A  # [R, ceil(V / 32)] int32: bit set = allowed


def build_grammar_mask(
    seqs: list[WorkerSequence], rows: tuple[int, ...], grammars: GrammarCache
) -> GrammarMask[torch.Tensor]:
    """The host mask of ``seqs[row]`` for each of ``rows`` (their matchers made on first use)."""
    num_words = -(-grammars.vocab_size // BITS)
    bitmask = torch.empty(len(rows), num_words, dtype=torch.int32)
    for index, row in enumerate(rows):
        seq = seqs[row]
        if seq.grammar is None:
            assert seq.params.constraint is not None
            seq.grammar = grammars.matcher(seq.params.constraint)
        seq.grammar.catch_up(seq.token_ids, seq.num_prompt_tokens)
        seq.grammar.fill(bitmask, index)
    return GrammarMask(torch.tensor(rows, dtype=torch.int64), bitmask)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [R, W] int32 -> [R, vocab_size] bool."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask[torch.Tensor]) -> torch.Tensor:
    """logits [B, V] -> a new [B, V] with the disallowed tokens of the mask's rows at -inf (a
    CUDA graph's logits stay as they were)."""
    allowed = allowed_tokens(mask.bitmask, logits.shape[1])
    z = logits[mask.rows].masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, mask.rows, z)
