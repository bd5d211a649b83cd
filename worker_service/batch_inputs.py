"""Step inputs: the one place a plan's scheduled sequences become tensors on the device.

Each scheduled sequence computes its tokens ``[num_computed, num_computed + n)``; their cache slots
follow from its block table. A token sampled by a step still in flight is ``PENDING`` here: its
value lives on the device and is gathered there (``pending_rows``), never waited for on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from worker_service.sequence_table import WorkerSequence

PENDING = -1  # placeholder for a token sampled by a step whose result is not back yet


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64 (PENDING where the value is still on the device)
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: list[int]  # rows (sequences) that reach their end and get a token sampled
    pending_token_indices: list[int]  # indices into input_ids to fill from the previous step
    pending_seq_ids: list[int]  # ... with the token that step sampled for these sequences


def build_inputs(
    seqs: list[WorkerSequence], num_new_tokens: list[int], block_size: int, device: torch.device
) -> StepInputs:
    num_seqs = len(seqs)
    counts = np.asarray(num_new_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
    ends = starts + counts
    cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])

    input_ids: list[int] = []
    sample_rows: list[int] = []
    pending_indices: list[int] = []
    pending_seq_ids: list[int] = []
    width = max(len(s.block_table) for s in seqs)
    tables = np.full((num_seqs, width), -1, dtype=np.int64)
    for row, seq in enumerate(seqs):
        start, end = int(starts[row]), int(ends[row])
        tokens = seq.token_ids
        input_ids.extend(tokens[start:end])
        tables[row, : len(seq.block_table)] = seq.block_table
        if end == len(tokens):
            sample_rows.append(row)
            if tokens[-1] == PENDING:
                pending_indices.append(int(cu_seqlens[row + 1]) - 1)
                pending_seq_ids.append(seq.seq_id)

    token_rows = np.repeat(np.arange(num_seqs), counts)
    positions = starts[token_rows] + np.arange(total) - cu_seqlens[:-1][token_rows]
    slots = tables[token_rows, positions // block_size] * block_size + positions % block_size
    max_seqlen_q = int(counts.max())
    meta = AttentionMetadata(
        slot_mapping=to_device(slots, torch.int64, device),
        cu_seqlens_q=to_device(cu_seqlens, torch.int32, device),
        seq_lens=to_device(ends, torch.int32, device),
        block_tables=to_device(tables, torch.int32, device),
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=int(ends.max()),
        is_decode=max_seqlen_q == 1,
        is_plain_prefill=bool((starts == 0).all()),
    )
    return StepInputs(
        input_ids=to_device(np.asarray(input_ids, dtype=np.int64), torch.int64, device),
        positions=to_device(positions, torch.int64, device),
        meta=meta,
        sample_rows=sample_rows,
        pending_token_indices=pending_indices,
        pending_seq_ids=pending_seq_ids,
    )


def to_device(values: np.ndarray | list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values to ``device`` without waiting for the device: through pinned memory.

    A copy from pageable memory would wait for every queued kernel first, which would serialise
    the step in flight with the host's preparation of the next one.
    """
    tensor = torch.as_tensor(np.asarray(values)).to(dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
