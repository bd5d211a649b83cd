"""Step inputs: the one place a plan's scheduled sequences become tensors on the device.

Each scheduled sequence computes its tokens ``[num_computed, num_computed + n)``; their cache slots
follow from its block table. A token sampled by a step still in flight is ``PENDING`` here: its
value lives on the device (the runner's ``prev_tokens``, row ``prev_row``) and is gathered there,
never waited for on the host.

A step's arrays are named fields of frozen dataclasses: ``StepArrays`` (tokens, positions, slots,
tables) and the sampling rows' ``SamplingArrays`` (worker_service/sampling.py), numpy arrays on
the host and views of one device buffer after packing. Packing lays them all out in one buffer
(``Layout``, 64-byte aligned offsets), so a step costs one host-to-device copy however many arrays
it has. A decode step in a CUDA graph packs into the graph's own layout and lands straight in its
static inputs (worker_service/cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch

from protos.step_plan import PENDING
from worker_service.sampling import SamplingArrays
from worker_service.sequence_table import SequenceTable, WorkerSequence

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

A = TypeVar("A")  # np.ndarray on the host, torch.Tensor on the device
N = TypeVar("N", bound="DataclassInstance")

_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}
_TORCH_DTYPES[np.dtype(np.float32)] = torch.float32


ALIGN = 64  # bytes; Triton specializes kernels on 16-byte aligned pointers: keep every view so


@dataclass(frozen=True)
class StepArrays(Generic[A]):
    """A step's model inputs: T tokens, S sequences, B_s sampling rows, W blocks per table."""

    input_ids: A  # [T] int64, 0 where prev_rows says the token is still on the device
    prev_rows: A  # [T] int64: the row of prev_tokens holding a pending token, else -1
    positions: A  # [T] int64
    slot_mapping: A  # [T] int64: the cache slot each token writes, -1 = none
    seq_lens: A  # [S] int32: context length after this step
    cu_seqlens_q: A  # [S + 1] int32
    block_tables: A  # [S, W] int32
    last_token_indices: A  # [B_s] int64: the token whose hidden state each sampling row reads


def named(arrays: DataclassInstance) -> dict[str, Any]:
    """A dataclass of arrays as {field name: array}."""
    return {f.name: getattr(arrays, f.name) for f in fields(arrays)}


def unpack(cls: type[N], views: Mapping[str, Any]) -> N:
    """The ``cls`` whose fields are the same-named entries of ``views``."""
    return cls(**{f.name: views[f.name] for f in fields(cls)})


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

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout that holds ``arrays``, with their dtypes and shapes."""
        return cls({name: (a.dtype, a.shape) for name, a in arrays.items()})

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


def host_buffer(nbytes: int, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """A host byte buffer to fill with numpy and copy to ``device``: pinned on CUDA (the copy
    then waits for nothing, and no second host copy is made), plain memory on CPU. The numpy
    array and the tensor share the memory."""
    if device.type != "cuda":
        buf = np.empty(nbytes, dtype=np.uint8)
        return buf, torch.from_numpy(buf)
    tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return tensor.numpy(), tensor


def upload(
    host: torch.Tensor, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy a ``host_buffer`` to ``device`` (into ``out`` if given) without waiting for the
    device. Its memory must stay untouched until the copy ran: a buffer from the caching host
    allocator is not handed out again before then; a reused one needs an event (cuda_graphs.py)."""
    if device.type != "cuda":
        return host if out is None else out.copy_(host)
    if out is None:
        return host.to(device, non_blocking=True)
    return out.copy_(host, non_blocking=True)


class PinnedRing:
    """Pinned host buffers handed out in turn as the targets of device-to-host copies (a fresh
    pinned tensor per step cost tens of microseconds of host time). With at most two steps in
    flight (async scheduling), a buffer comes round again long after its contents were read."""

    def __init__(self, size: int, dtype: torch.dtype, count: int = 4, pin: bool = True) -> None:
        self._buffers = [torch.empty(size, dtype=dtype, pin_memory=pin) for _ in range(count)]
        self._num_copies = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """Start copying 1-D ``tensor`` into the next buffer; valid once the copy has run."""
        buffer = self._buffers[self._num_copies % len(self._buffers)]
        self._num_copies += 1
        return buffer[: len(tensor)].copy_(tensor, non_blocking=True)


def pack(arrays: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """``arrays`` on ``device``, through one buffer and one copy."""
    layout = Layout.of(arrays)
    buf, host = host_buffer(layout.nbytes, device)
    for name, view in layout.host_views(buf).items():
        view[...] = arrays[name]
    return layout.device_views(upload(host, device))


def pack_step(
    step: StepArrays[np.ndarray], sampling: SamplingArrays[np.ndarray], device: torch.device
) -> tuple[StepArrays[torch.Tensor], SamplingArrays[torch.Tensor]]:
    """A step's model and sampling arrays on ``device``, in one copy."""
    views = pack(named(step) | named(sampling), device)
    return unpack(StepArrays, views), unpack(SamplingArrays, views)


@dataclass
class HostStep:
    """A step's inputs on the host; ``sample_rows`` are the sequences that get a token sampled."""

    arrays: StepArrays[np.ndarray]
    sample_rows: list[int]
    num_tokens: int
    max_seqlen_q: int
    max_seqlen_k: int
    is_plain_prefill: bool
    num_pending: int  # tokens to gather from the previous step's sampled tokens

    @property
    def is_decode(self) -> bool:
        return self.max_seqlen_q == 1


def longest_context_first(seqs: list[WorkerSequence]) -> list[WorkerSequence]:
    """A decode step's rows, longest context first (ties in plan order). The decode attention's
    programs start in row order, so the longest ones start first and the short ones fill in
    behind them, instead of a long one starting last and running alone at the kernel's end."""
    return sorted(seqs, key=lambda s: -s.num_computed_tokens)


def build_host_step(
    seqs: list[WorkerSequence],
    num_new_tokens: list[int],
    table: SequenceTable,
    block_size: int,
    prev_rows: dict[int, int],
) -> HostStep:
    """The numpy arrays of a step (``StepArrays``): a pending token's ``input_ids`` entry is 0
    and its ``prev_rows`` entry says which row of the previous step's tokens holds it."""
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
    arrays = StepArrays(
        input_ids=input_ids,
        prev_rows=prev,
        positions=positions,
        slot_mapping=slots,
        seq_lens=ends.astype(np.int32),
        cu_seqlens_q=cu_seqlens.astype(np.int32),
        block_tables=tables,
        last_token_indices=last[sampled],
    )
    return HostStep(
        arrays,
        sampled.tolist(),
        total,
        int(counts.max()),
        int(ends.max()),
        bool((starts == 0).all()),
        len(pending_rows),
    )
