"""Penalties and logit bias: the per-request changes to a row's logits before it is sampled.

The semantics are vLLM's (its ``apply_penalties`` and logit-bias processor), which the OpenAI API
and transformers define the same way:

- ``logit_bias`` is added to the named tokens' logits, first;
- ``repetition_penalty`` r: for every token in the prompt or the output so far, a positive logit
  is divided by r and a negative one multiplied by it (transformers'
  RepetitionPenaltyLogitsProcessor over prompt + output);
- ``frequency_penalty`` f and ``presence_penalty`` p: the logit loses f times the token's count
  in the output, and p once if that count is not zero.

Only the rows whose request asks for one take part (``AdjustArrays.rows``): a step without any
never builds them, so it costs nothing. The host lays out each such row's token history, padded
with the vocabulary size (an index past every token, dropped after counting); the device counts
it. A row's newest output token may still be PENDING on the host (sampled by the step in flight):
``resolve_pending`` reads it from the runner's ``prev_tokens`` on the device, and must be queued
before the step's forward, since a CUDA graph's replay overwrites ``prev_tokens`` with this
step's draws. Not here: the choice of rows and where the adjustment runs (sampling.py), the move
to the device (model_runner.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np
import torch

from protos.step_plan import PENDING
from worker_service.sequence_table import WorkerSequence

A = TypeVar("A")  # np.ndarray on the host, torch.Tensor on the device


@dataclass(frozen=True)
class AdjustArrays(Generic[A]):
    """Per adjusted row (R rows; at most Lp prompt ids, Lo output ids and K biased ids a row)."""

    rows: A  # [R] int64: the sampling row each one adjusts
    presence: A  # [R] float32, 0 = off
    frequency: A  # [R] float32, 0 = off
    repetition: A  # [R] float32, 1 = off
    prompt_ids: A  # [R, Lp] int64: each prompt's distinct ids, V = padding (only rows with a
    # repetition penalty fill it)
    output_ids: A  # [R, Lo] int64, V = padding, PENDING = the token at prev_tokens[pending_rows]
    pending_rows: A  # [R] int64: the prev_tokens row of a PENDING output token, else 0
    bias_ids: A  # [R, K] int64, V = padding
    bias_values: A  # [R, K] float32


def _padded(lists: Sequence[Sequence[int] | np.ndarray], pad: int) -> np.ndarray:
    """[len(lists), longest (at least 1)] int64, ``pad`` past each list's end."""
    out = np.full((len(lists), max(1, max(map(len, lists), default=0))), pad, dtype=np.int64)
    for row, ids in enumerate(lists):
        out[row, : len(ids)] = ids
    return out


def build_adjust_arrays(
    seqs: list[WorkerSequence], rows: list[int], vocab_size: int, prev_rows: dict[int, int]
) -> AdjustArrays[np.ndarray]:
    """The arrays of ``seqs[row]`` for each of ``rows``; ``prev_rows``: seq_id -> the
    prev_tokens row of its token in flight (the runner's)."""
    chosen = [seqs[row] for row in rows]
    params = [s.params for s in chosen]
    outputs = [s.token_ids[s.num_prompt_tokens :] for s in chosen]
    prompts: list[np.ndarray | list[int]] = [
        s.prompt_token_set if p.repetition_penalty != 1.0 else [] for s, p in zip(chosen, params)
    ]
    pending_rows = [
        prev_rows[s.seq_id] if out and out[-1] == PENDING else 0 for s, out in zip(chosen, outputs)
    ]
    biases = [p.logit_bias for p in params]
    bias_values = np.zeros((len(rows), max(1, max(map(len, biases), default=0))), np.float32)
    for row, bias in enumerate(biases):
        bias_values[row, : len(bias)] = list(bias.values())
    return AdjustArrays(
        rows=np.asarray(rows, dtype=np.int64),
        presence=np.array([p.presence_penalty for p in params], dtype=np.float32),
        frequency=np.array([p.frequency_penalty for p in params], dtype=np.float32),
        repetition=np.array([p.repetition_penalty for p in params], dtype=np.float32),
        prompt_ids=_padded(prompts, vocab_size),
        output_ids=_padded(outputs, vocab_size),
        pending_rows=np.asarray(pending_rows, dtype=np.int64),
        bias_ids=_padded([list(b) for b in biases], vocab_size),
        bias_values=bias_values,
    )


def resolve_pending(
    x: AdjustArrays[torch.Tensor], prev_tokens: torch.Tensor
) -> AdjustArrays[torch.Tensor]:
    """The same arrays with each PENDING output id replaced by its value in ``prev_tokens``."""
    pending = prev_tokens[x.pending_rows][:, None]  # [R, 1]
    return replace(x, output_ids=torch.where(x.output_ids == PENDING, pending, x.output_ids))


def _counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids [R, L] (V = padding) -> how often each token occurs [R, V] float32."""
    counts = torch.zeros(len(ids), vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_adjust(logits: torch.Tensor, x: AdjustArrays[torch.Tensor]) -> torch.Tensor:
    """logits [B, V] -> float32 logits [B, V] with the adjusted rows' bias and penalties applied
    (a new tensor: a CUDA graph's logits stay as they were)."""
    vocab_size = logits.shape[1]
    z = logits[x.rows].float()  # [R, V]
    bias = torch.zeros(len(z), vocab_size + 1, dtype=torch.float32, device=z.device)
    z += bias.scatter_add_(1, x.bias_ids, x.bias_values)[:, :vocab_size]
    output_counts = _counts(x.output_ids, vocab_size)
    in_output = output_counts > 0
    seen = (_counts(x.prompt_ids, vocab_size) > 0) | in_output
    repetition = torch.where(seen, x.repetition[:, None], 1.0)
    z = torch.where(z > 0, z / repetition, z * repetition)
    z -= x.frequency[:, None] * output_counts + x.presence[:, None] * in_output
    return logits.to(torch.float32, copy=True).index_copy_(0, x.rows, z)


def apply_adjust_ref(
    logits: torch.Tensor, seqs: list[WorkerSequence], tokens_of: dict[int, list[int]]
) -> torch.Tensor:
    """A plain per-row, per-token reference of ``apply_adjust`` for the tests: row i is adjusted
    by ``seqs[i].params`` with ``tokens_of[i]`` as its token ids (prompt then output)."""
    out = logits.float().clone()
    for row, seq in enumerate(seqs):
        p, ids = seq.params, tokens_of[row]
        output = ids[seq.num_prompt_tokens :]
        for token_id, bias in p.logit_bias.items():
            out[row, token_id] += bias
        for token_id in set(ids):
            value = out[row, token_id]
            r = p.repetition_penalty
            out[row, token_id] = value / r if value > 0 else value * r
        for token_id in set(output):
            out[row, token_id] -= p.frequency_penalty * output.count(token_id)
            out[row, token_id] -= p.presence_penalty
    return out
