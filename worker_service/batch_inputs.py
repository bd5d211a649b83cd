"""Step inputs: the one place a plan's scheduled sequences become tensors on the device.

Each scheduled sequence computes its tokens ``[num_computed, num_computed + n)``; their cache slots
follow from its block table. A token sampled by a step still in flight is ``PENDING`` here: its
value lives on the device (the runner's ``prev_tokens``, row ``prev_row``) and is gathered there,
never waited for on the host.

Every array a step needs (tokens, positions, slots, tables, the sampling rows' temperatures and
seeds) is built with numpy and packed into one buffer (``Layout``), so a step costs one
host-to-device copy however many arrays it has. A decode step in a CUDA graph packs into the
graph's own layout and lands straight in its static inputs (worker_service/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protos.step_plan import PENDING
from worker_service.sequence_table import SequenceTable, WorkerSequence

_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}
_TORCH_DTYPES[np.dtype(np.float32)] = torch.float32


ALIGN = 64  # bytes; Triton specializes kernels on 16-byte aligned pointers: keep every view so


class Layout:
    """Named arrays at fixed, ``ALIGN``-byte aligned offsets of one byte buffer (host or device)."""

    def __init__(self, fields: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        self.fields = fields
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (dtype, shape) in fields.items():
            self.offsets[name] = offset
            offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
        self.nbytes = max(offset, ALIGN)

    def host_views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        return {
            name: buf[self.offsets[name] :].view(dtype)[: int(np.prod(shape))].reshape(shape)
            for name, (dtype, shape) in self.fields.items()
        }

    def device_views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for name, (dtype, shape) in self.fields.items():
            start = self.offsets[name]
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            views[name] = buf[start : start + size].view(_TORCH_DTYPES[np.dtype(dtype)]).view(shape)
        return views


def upload(buf: np.ndarray, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy a host byte buffer to ``device`` (into ``out`` if given) without waiting for the
    device: through pinned memory. A copy from pageable memory would wait for every queued kernel
    first, serialising the step in flight with the host's preparation of the next one."""
    host = torch.from_numpy(buf)
    if device.type != "cuda":
        return host if out is None else out.copy_(host)
    pinned = host.pin_memory()
    if out is None:
        return pinned.to(device, non_blocking=True)
    return out.copy_(pinned, non_blocking=True)


def pack(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """``arrays`` on ``device``, through one buffer and one copy."""
    layout = Layout({name: (a.dtype, a.shape) for name, a in arrays.items()})
    buf = np.empty(layout.nbytes, dtype=np.uint8)
    for name, view in layout.host_views(buf).items():
        view[...] = arrays[name]
    return layout.device_views(upload(buf, device))


@dataclass
class HostStep:
    """A step's inputs on the host; ``sample_rows`` are the sequences that get a token sampled."""

    arrays: dict[str, np.ndarray]  # input_ids, prev_rows, positions, slot_mapping, seq_lens, ...
    sample_rows: list[int]
    num_tokens: int
    max_seqlen_q: int
    max_seqlen_k: int
    is_plain_prefill: bool
    num_pending: int  # tokens to gather from the previous step's sampled tokens

    @property
    def is_decode(self) -> bool:
        return self.max_seqlen_q == 1


def build_host_step(
    seqs: list[WorkerSequence],
    num_new_tokens: list[int],
    table: SequenceTable,
    block_size: int,
    prev_rows: dict[int, int],
) -> HostStep:
    """The numpy arrays of a step: per token ``input_ids`` (PENDING where ``prev_rows`` says which
    row of the previous step's tokens holds it), ``positions`` and ``slot_mapping``; per sequence
    ``seq_lens``, ``cu_seqlens_q`` and ``block_tables``; ``last_token_indices`` per sampled row."""
    num_seqs = len(seqs)
    counts = np.asarray(num_new_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
    ends = starts + counts
    cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])
    decode = bool((counts == 1).all())

    if decode:  # one token per sequence
        input_ids = np.fromiter(
            (s.token_ids[s.num_computed_tokens] for s in seqs), dtype=np.int64, count=num_seqs
        )
    else:
        ids: list[int] = []
        for row, seq in enumerate(seqs):
            ids.extend(seq.token_ids[int(starts[row]) : int(ends[row])])
        input_ids = np.asarray(ids, dtype=np.int64)
    lengths = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=num_seqs)
    sampled = np.flatnonzero(ends == lengths)  # rows that reach their end sample a token
    last = cu_seqlens[1:] - 1  # each sequence's last token this step
    prev = np.full(total, -1, dtype=np.int64)
    pending_rows = sampled[input_ids[last[sampled]] == PENDING]
    if len(pending_rows):
        prev[last[pending_rows]] = [prev_rows[seqs[row].seq_id] for row in pending_rows.tolist()]
        input_ids[last[pending_rows]] = 0

    rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=num_seqs)
    width = max(1, max(s.num_blocks for s in seqs))
    tables = table.block_tables[rows, :width]
    token_rows = np.repeat(np.arange(num_seqs), counts)
    positions = starts[token_rows] + np.arange(total) - cu_seqlens[:-1][token_rows]
    slots = tables[token_rows, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size
    arrays = {
        "input_ids": input_ids,
        "prev_rows": prev,
        "positions": positions,
        "slot_mapping": slots,
        "seq_lens": ends.astype(np.int32),
        "cu_seqlens_q": cu_seqlens.astype(np.int32),
        "block_tables": tables,
        "last_token_indices": last[sampled],
    }
    return HostStep(
        arrays,
        sampled.tolist(),
        total,
        int(counts.max()),
        int(ends.max()),
        bool((starts == 0).all()),
        len(pending_rows),
    )
