"""CUDA graphs for decode steps: captured once per batch-size bucket, replayed with padded inputs.

A decode step of a small model is dominated by launch overhead, on the device and on the host; a
graph removes both. Buckets are 1, 2, 4, 8, then steps of 16 up to max_num_seqs. One graph covers
the whole step: gathering the tokens sampled by the previous step (``prev_tokens``), the forward,
the logits and the sampling kernel on the raw logits, whose tokens land in ``prev_tokens`` again
for the next step.

Its inputs are a ``StepArrays`` and a ``SamplingArrays`` of views into one static device buffer
(``Layout``): the host packs a step into the same layout (padded rows write nowhere: slot -1,
length 1, block 0, greedy) and one copy fills them all. A step whose sampling needs more than the
kernel on the raw logits (filters, min_tokens) is sampled again after the replay, by the same
``sample`` on the graph's logits and the graph's own sampling views; for a row without filters
that draw is the graph's draw. A step whose rows ban more than ``MAX_BANNED_IDS`` tokens runs
eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from models.qwen3 import Qwen3ForCausalLM
from worker_service.batch_inputs import (
    HostStep,
    Layout,
    StepArrays,
    host_buffer,
    named,
    unpack,
    upload,
)
from worker_service.sampling import SamplingArrays, SamplingInput

NUM_HOST_BUFFERS = 3  # the steps whose inputs can be on their way at once, and one more
MAX_BANNED_IDS = 8  # per row under min_tokens (EOS and stop ids) that a graph step has room for


def batch_buckets(max_num_seqs: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs + 16, 16))
    return sorted({min(b, max_num_seqs) for b in buckets} | {max_num_seqs})


def _capacity(n: int, max_blocks: int) -> tuple[StepArrays[np.ndarray], SamplingArrays[np.ndarray]]:
    """Zero arrays of a full decode step of ``n`` rows: the shapes and dtypes of the layout."""
    i64, i32, f32 = np.int64, np.int32, np.float32
    step: StepArrays[np.ndarray] = StepArrays(
        input_ids=np.zeros(n, i64),
        prev_rows=np.zeros(n, i64),
        positions=np.zeros(n, i64),
        slot_mapping=np.zeros(n, i64),
        seq_lens=np.zeros(n, i32),
        cu_seqlens_q=np.zeros(n + 1, i32),
        block_tables=np.zeros((n, max_blocks), i32),
        last_token_indices=np.zeros(n, i64),
    )
    sampling: SamplingArrays[np.ndarray] = SamplingArrays(
        temperatures=np.zeros(n, f32),
        seeds=np.zeros(n, i64),
        top_ks=np.zeros(n, i64),
        top_ps=np.zeros(n, f32),
        min_ps=np.zeros(n, f32),
        banned_ids=np.zeros((n, MAX_BANNED_IDS), i64),
    )
    return step, sampling


@dataclass
class _HostSlot:
    """One pinned host buffer of the layout, its views, and the event of its last copy."""

    tensor: torch.Tensor
    inputs: StepArrays[np.ndarray]
    sampling: SamplingArrays[np.ndarray]
    copied: torch.cuda.Event | None = None


def _put(view: np.ndarray, values: np.ndarray, pad: float) -> None:
    """``values`` in the first rows of ``view`` (and its first columns), ``pad`` everywhere else."""
    num_rows = len(values)
    if values.ndim == 2:
        view[:num_rows, : values.shape[1]] = values
        view[:num_rows, values.shape[1] :] = pad
    else:
        view[:num_rows] = values
    view[num_rows:] = pad


class DecodeGraphs:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        prev_tokens: torch.Tensor,  # [>= max_num_seqs] int64: the runner's last sampled tokens
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = batch_buckets(max_num_seqs)
        self.max_num_seqs = n = self.buckets[-1]
        self.max_blocks = max_num_blocks_per_seq
        step, sampling = _capacity(n, max_num_blocks_per_seq)
        self.layout = Layout.of(named(step) | named(sampling))
        self.static = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        views = self.layout.device_views(self.static)
        self.inputs_gpu: StepArrays[torch.Tensor] = unpack(StepArrays, views)
        self.sampling_gpu: SamplingArrays[torch.Tensor] = unpack(SamplingArrays, views)
        # The host side: pinned buffers used in turn, each refilled in place once the copy out of
        # it has run (with two steps in flight that is long done: nothing waits).
        self._host_slots = [self._host_slot(device) for _ in range(NUM_HOST_BUFFERS)]
        self._num_loads = 0
        self.prev_tokens = prev_tokens
        self._sampling_rows: dict[int, SamplingArrays[torch.Tensor]] = {}  # per batch size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor | None] = {}  # per bucket, valid after its replay

    def _meta(self, bs: int) -> AttentionMetadata:
        x = self.inputs_gpu
        return AttentionMetadata(
            slot_mapping=x.slot_mapping[:bs],
            cu_seqlens_q=x.cu_seqlens_q[: bs + 1],
            seq_lens=x.seq_lens[:bs],
            block_tables=x.block_tables[:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.max_blocks,  # only shapes matter to the kernels
            is_decode=True,
            is_plain_prefill=False,
        )

    def _step(self, bs: int) -> torch.Tensor | None:
        """The captured work: gather pending tokens, forward, logits, sample into prev_tokens."""
        from kernels.sample_tokens import sample_tokens

        x, s = self.inputs_gpu, self.sampling_gpu
        prev = x.prev_rows[:bs]
        ids = torch.where(prev >= 0, self.prev_tokens[prev.clamp(min=0)], x.input_ids[:bs])
        hidden = self.model(ids, x.positions[:bs], self._meta(bs))
        logits = self.model.compute_logits(hidden)  # None on ranks other than 0
        if logits is not None:
            tokens = sample_tokens(logits, s.temperatures[:bs], s.seeds[:bs])
            self.prev_tokens[:bs].copy_(tokens)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        x = self.inputs_gpu
        x.slot_mapping.fill_(-1)
        x.prev_rows.fill_(-1)
        x.seq_lens.fill_(1)
        x.cu_seqlens_q.copy_(torch.arange(self.max_num_seqs + 1, dtype=torch.int32))
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            self._step(bs)  # warm-up: Triton compiles and autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._step(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, step: HostStep, sampling: SamplingInput[np.ndarray]) -> bool:
        """A decode step in which every row samples, and whose arrays fit the layout."""
        num_seqs = len(step.arrays.seq_lens)
        return (
            step.is_decode
            and num_seqs <= self.max_num_seqs
            and len(step.sample_rows) == num_seqs
            and step.arrays.block_tables.shape[1] <= self.max_blocks
            and sampling.arrays.banned_ids.shape[1] <= MAX_BANNED_IDS
        )

    def run(
        self, step: HostStep, sampling: SamplingInput[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor | None, SamplingInput[torch.Tensor]]:
        """Replay for ``step``: its tokens [bs], its logits [bs, V] (rank 0; else None) and its
        sampling input as views of the graph's own inputs, for a second draw."""
        bs = len(step.arrays.input_ids)
        bucket = next(b for b in self.buckets if b >= bs)
        self.load(step, sampling)
        self.graphs[bucket].replay()
        logits = self.logits[bucket]
        rows = self._sampling_rows.get(bs)
        if rows is None:
            rows = unpack(SamplingArrays, {k: v[:bs] for k, v in named(self.sampling_gpu).items()})
            self._sampling_rows[bs] = rows
        return self.prev_tokens[:bs], None if logits is None else logits[:bs], sampling.on(rows)

    def _host_slot(self, device: torch.device) -> _HostSlot:
        buf, tensor = host_buffer(self.layout.nbytes, device)
        buf[:] = 0
        views = self.layout.host_views(buf)
        inputs = unpack(StepArrays, views)
        rows = np.arange(self.max_num_seqs + 1)  # a decode row's one token: the same every step
        inputs.cu_seqlens_q[:] = rows
        inputs.last_token_indices[:] = rows[:-1]
        return _HostSlot(tensor, inputs, unpack(SamplingArrays, views))

    def load(self, step: HostStep, sampling: SamplingInput[np.ndarray]) -> None:
        """Fill the graphs' static inputs with ``step``, padded to the capacity, in one copy."""
        slot = self._host_slots[self._num_loads % len(self._host_slots)]
        self._num_loads += 1
        if slot.copied is not None:
            slot.copied.synchronize()  # its last copy has run: the memory is free again
        self._fill(slot.inputs, step.arrays)
        self._fill_sampling(slot.sampling, sampling.arrays)
        upload(slot.tensor, self.static.device, out=self.static)
        if self.static.is_cuda:
            slot.copied = torch.cuda.Event()
            slot.copied.record()

    @staticmethod
    def _fill(host: StepArrays[np.ndarray], step: StepArrays[np.ndarray]) -> None:
        """Padded rows: no cache slot, nothing pending, length 1, block 0 (cu_seqlens_q and
        last_token_indices never change: one token per row, set when the slot is made). Of the
        block tables only the step's own columns are written: a row reads no entry past its
        length, so what earlier steps left beyond them is never read, and a step costs the same
        whatever the capacity (max_model_len) is."""
        _put(host.input_ids, step.input_ids, 0)
        _put(host.prev_rows, step.prev_rows, -1)
        _put(host.positions, step.positions, 0)
        _put(host.slot_mapping, step.slot_mapping, -1)
        _put(host.seq_lens, step.seq_lens, 1)
        num_rows, width = step.block_tables.shape
        host.block_tables[:num_rows, :width] = step.block_tables
        host.block_tables[num_rows:, 0] = 0

    @staticmethod
    def _fill_sampling(host: SamplingArrays[np.ndarray], rows: SamplingArrays[np.ndarray]) -> None:
        """Padded rows are greedy; unused banned slots are -1 (nothing)."""
        _put(host.temperatures, rows.temperatures, 0.0)
        _put(host.seeds, rows.seeds, 0)
        _put(host.top_ks, rows.top_ks, 0)
        _put(host.top_ps, rows.top_ps, 1.0)
        _put(host.min_ps, rows.min_ps, 0.0)
        _put(host.banned_ids, rows.banned_ids, -1)
