"""CUDA graphs for the engine's steps: captured once per bucket, replayed with padded inputs.

A step of a small model is dominated by launch overhead, on the device and on the host; a graph
removes both. Two kinds of step are captured, each a ``StepGraphs`` (this file: the machinery
they share). Decode steps (``DecodeGraphs``, worker_service/decode_graphs.py): one token per row,
buckets of batch size 1, 2, 4, 8, then steps of 16 up to max_num_seqs. Prefill, chunked and mixed
steps (``PrefillGraphs``, worker_service/prefill_graphs.py): buckets of token count, a fixed
number of rows (a narrow kind of 16 rows, a wide one of max_num_seqs). One graph covers the
whole step: gathering the tokens sampled by the previous step (``prev_tokens``), the forward,
the logits of the sampling rows and the sampling kernel on the raw logits.

Its inputs are a ``StepArrays`` and a ``SamplingArrays`` of views into one static device buffer
(``Layout``): the host packs a step into the same layout (padded tokens and rows write nowhere:
slot -1, nothing pending, greedy) and one copy fills them all. A step whose sampling needs more
than the kernel on the raw logits (filters, min_tokens) is sampled again after the replay, by the
same ``sample`` on the graph's logits and the graph's own sampling views; for a row without
filters that draw is the graph's draw. A step whose rows ban more than ``MAX_BANNED_IDS`` tokens
runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

NUM_HOST_BUFFERS = 3  # the steps whose inputs can be on their way at once, and one more
MAX_BANNED_IDS = 8  # per row under min_tokens (EOS and stop ids) that a graph step has room for


def batch_buckets(max_num_seqs: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs + 16, 16))
    return sorted({min(b, max_num_seqs) for b in buckets} | {max_num_seqs})


def _capacity(
    rows: int, tokens: int, max_blocks: int
) -> tuple[StepArrays[np.ndarray], SamplingArrays[np.ndarray]]:
    """Zero arrays of a step of ``tokens`` tokens in ``rows`` rows (every row sampling): the
    shapes and dtypes of a layout."""
    i64, i32, f32 = np.int64, np.int32, np.float32
    step: StepArrays[np.ndarray] = StepArrays(
        input_ids=np.zeros(tokens, i64),
        prev_rows=np.zeros(tokens, i64),
        positions=np.zeros(tokens, i64),
        slot_mapping=np.zeros(tokens, i64),
        seq_lens=np.zeros(rows, i32),
        cu_seqlens_q=np.zeros(rows + 1, i32),
        block_tables=np.zeros((rows, max_blocks), i32),
        last_token_indices=np.zeros(rows, i64),
    )
    sampling: SamplingArrays[np.ndarray] = SamplingArrays(
        temperatures=np.zeros(rows, f32),
        seeds=np.zeros(rows, i64),
        top_ks=np.zeros(rows, i64),
        top_ps=np.zeros(rows, f32),
        min_ps=np.zeros(rows, f32),
        banned_ids=np.zeros((rows, MAX_BANNED_IDS), i64),
    )
    return step, sampling


@dataclass
class _HostSlot:
    """One pinned host buffer of the layout, its views, and the event of its last copy."""

    tensor: torch.Tensor
    inputs: StepArrays[np.ndarray]
    sampling: SamplingArrays[np.ndarray]
    copied: torch.cuda.Event | None = None


def put(view: np.ndarray, values: np.ndarray, pad: float) -> None:
    """``values`` in the first rows of ``view`` (and its first columns), ``pad`` everywhere else."""
    num_rows = len(values)
    if values.ndim == 2:
        view[:num_rows, : values.shape[1]] = values
        view[:num_rows, values.shape[1] :] = pad
    else:
        view[:num_rows] = values
    view[num_rows:] = pad


def put_tokens(host: StepArrays[np.ndarray], step: StepArrays[np.ndarray]) -> None:
    """The per-token arrays; padded tokens: no cache slot, nothing pending, position 0."""
    put(host.input_ids, step.input_ids, 0)
    put(host.prev_rows, step.prev_rows, -1)
    put(host.positions, step.positions, 0)
    put(host.slot_mapping, step.slot_mapping, -1)


def put_tables(host: StepArrays[np.ndarray], step: StepArrays[np.ndarray]) -> None:
    """Of the block tables only the step's own columns are written: a row reads no entry past
    its length, so what earlier steps left beyond them is never read, and a step costs the same
    whatever the capacity (max_model_len) is. Padded rows read block 0."""
    num_rows, width = step.block_tables.shape
    host.block_tables[:num_rows, :width] = step.block_tables
    host.block_tables[num_rows:, 0] = 0


class StepGraphs:
    """What both kinds share: the static inputs, the pinned host buffers filled in turn, the
    capture of every bucket into one memory pool, and the replay. A subclass says how a step
    maps to a bucket, which rows and tokens each bucket runs, and how padding is filled."""

    kind = ""

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        buckets: list[int],
        rows: int,  # sampling rows (and sequences) the layout holds
        tokens: int,  # tokens the layout holds
        max_blocks: int,
        prev_tokens: torch.Tensor,  # [>= rows] int64: the runner's last sampled tokens
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = buckets
        self.rows, self.max_blocks = rows, max_blocks
        step, sampling = _capacity(rows, tokens, max_blocks)
        self.layout = Layout.of(named(step) | named(sampling))
        self.static = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        views = self.layout.device_views(self.static)
        self.inputs_gpu: StepArrays[torch.Tensor] = unpack(StepArrays, views)
        self.sampling_gpu: SamplingArrays[torch.Tensor] = unpack(SamplingArrays, views)
        # The host side: pinned buffers used in turn, each refilled in place once the copy out of
        # it has run (with two steps in flight that is long done: nothing waits).
        self._host_slots = [self._host_slot(device) for _ in range(NUM_HOST_BUFFERS)]
        self._num_loads = 0
        self.num_replays = 0
        self.prev_tokens = prev_tokens
        self._sampling_rows: dict[int, SamplingArrays[torch.Tensor]] = {}  # per sampling rows
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor | None] = {}  # per bucket, valid after its replay

    # What a subclass says.
    def bucket(self, step: HostStep) -> int | None:
        """The bucket that holds ``step``, or None."""
        raise NotImplementedError

    def meta(self, bucket: int) -> AttentionMetadata:
        raise NotImplementedError

    def fill(self, host: StepArrays[np.ndarray], step: StepArrays[np.ndarray]) -> None:
        """``step`` into a host slot's arrays, padded to the capacity."""
        raise NotImplementedError

    def sampling_hidden(self, hidden: torch.Tensor, bucket: int) -> torch.Tensor:
        """The hidden states of the bucket's sampling rows."""
        raise NotImplementedError

    def tokens_out(self, bucket: int) -> torch.Tensor:
        """Where the bucket's sampled tokens go."""
        raise NotImplementedError

    def num_rows(self, bucket: int) -> int:
        """The sampling rows the bucket runs."""
        raise NotImplementedError

    def prepare_capture(self) -> None:
        """Inputs that write nowhere, for the warm-up and the capture."""
        x = self.inputs_gpu
        x.slot_mapping.fill_(-1)
        x.prev_rows.fill_(-1)
        x.seq_lens.fill_(1)

    # What both share.
    def _step(self, bucket: int) -> torch.Tensor | None:
        """The captured work: gather pending tokens, forward, logits, sample."""
        from kernels.sample_tokens import sample_tokens

        x, s, meta = self.inputs_gpu, self.sampling_gpu, self.meta(bucket)
        rows, tokens = self.num_rows(bucket), meta.slot_mapping.shape[0]
        ids, prev = x.input_ids[:tokens], x.prev_rows[:tokens]
        hidden = self.model(ids, x.positions[:tokens], meta, prev, self.prev_tokens)
        logits = self.model.compute_logits(self.sampling_hidden(hidden, bucket))
        if logits is not None:  # None on ranks other than 0
            out = self.tokens_out(bucket)[:rows]
            sample_tokens(logits, s.temperatures[:rows], s.seeds[:rows], out=out)
        return logits

    @torch.inference_mode()
    def capture(self, pool: _POOL_HANDLE | None = None) -> _POOL_HANDLE | None:
        """Capture every bucket, largest first, so smaller graphs reuse its memory; the pool,
        for the next kind to share."""
        self.prepare_capture()
        for bucket in reversed(self.buckets):
            self._step(bucket)  # warm-up: Triton compiles and autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bucket] = self._step(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        for graph in self.graphs.values():
            graph.replay()  # the first replay uploads the graph: not in a user's step
        torch.cuda.synchronize()
        return pool

    def fitting_bucket(self, step: HostStep, sampling: SamplingInput[np.ndarray]) -> int | None:
        """The bucket of a step that fits one and whose block tables and banned ids fit the
        layout; else None."""
        if (
            step.arrays.block_tables.shape[1] > self.max_blocks
            or sampling.arrays.banned_ids.shape[1] > MAX_BANNED_IDS
        ):
            return None
        return self.bucket(step)

    def run(
        self, bucket: int, step: HostStep, sampling: SamplingInput[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor | None, SamplingInput[torch.Tensor]]:
        """Replay ``bucket`` (``fitting_bucket``'s) for ``step``: its tokens [B_s], its logits
        [B_s, V] (rank 0; else None) and its sampling input as views of the graph's own inputs,
        for a second draw."""
        num_sampled = len(step.sample_rows)
        self.load(step, sampling)
        self.graphs[bucket].replay()
        self.num_replays += 1
        logits = self.logits[bucket]
        rows = self._sampling_rows.get(num_sampled)
        if rows is None:
            views = named(self.sampling_gpu)
            rows = unpack(SamplingArrays, {k: v[:num_sampled] for k, v in views.items()})
            self._sampling_rows[num_sampled] = rows
        tokens = self.tokens_out(bucket)[:num_sampled]
        return tokens, None if logits is None else logits[:num_sampled], sampling.on(rows)

    def _host_slot(self, device: torch.device) -> _HostSlot:
        buf, tensor = host_buffer(self.layout.nbytes, device)
        buf[:] = 0
        views = self.layout.host_views(buf)
        return _HostSlot(tensor, unpack(StepArrays, views), unpack(SamplingArrays, views))

    def load(self, step: HostStep, sampling: SamplingInput[np.ndarray]) -> None:
        """Fill the graphs' static inputs with ``step``, padded to the capacity, in one copy."""
        slot = self._host_slots[self._num_loads % len(self._host_slots)]
        self._num_loads += 1
        if slot.copied is not None:
            slot.copied.synchronize()  # its last copy has run: the memory is free again
        self.fill(slot.inputs, step.arrays)
        self._fill_sampling(slot.sampling, sampling.arrays)
        upload(slot.tensor, self.static.device, out=self.static)
        if self.static.is_cuda:
            slot.copied = torch.cuda.Event()
            slot.copied.record()

    @staticmethod
    def _fill_sampling(host: SamplingArrays[np.ndarray], rows: SamplingArrays[np.ndarray]) -> None:
        """Padded rows are greedy; unused banned slots are -1 (nothing)."""
        put(host.temperatures, rows.temperatures, 0.0)
        put(host.seeds, rows.seeds, 0)
        put(host.top_ks, rows.top_ks, 0)
        put(host.top_ps, rows.top_ps, 1.0)
        put(host.min_ps, rows.min_ps, 0.0)
        put(host.banned_ids, rows.banned_ids, -1)
