"""ModelRunner: runs one step of the model on prepared inputs and samples, without waiting.

``launch`` queues the forward pass and sampling on the device and returns at once; ``collect``
waits for that step's tokens and writes them into the sequences. Between the two the host is free
to prepare the next step, whose inputs read this step's tokens straight from the device
(``prev_tokens``, where every step leaves its sampled tokens). That is what lets the scheduler run
one step ahead (async scheduling). A decode step whose batch fits a CUDA graph, or a prefill or mixed step of
few tokens, runs as one replay (worker_service/cuda_graphs.py); other steps run eagerly on packed
inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from models.parallel import SINGLE_RANK, ParallelContext, broadcast
from models.qwen3 import Qwen3ForCausalLM
from protos.step_plan import PENDING, StepResult
from worker_service.batch_inputs import (
    HostStep,
    PinnedRing,
    build_host_step,
    longest_context_first,
    named,
    pack,
    pack_step,
    unpack,
)
from worker_service.cuda_graphs import StepGraphs
from worker_service.grammar_mask import GrammarMask, build_grammar_mask
from worker_service.grammars import GrammarCache
from worker_service.logit_adjust import AdjustArrays, build_adjust_arrays, resolve_pending
from worker_service.sampling import (
    SamplingInput,
    build_sampling_input,
    compute_logprobs,
    logprob_lists,
    sample,
)
from worker_service.sequence_table import SequenceTable, WorkerSequence

Logprobs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sampled [B], top ids and lps [B, k]


@dataclass
class LaunchedStep:
    """A step queued on the device: whose tokens it samples and where they will land."""

    step_id: int
    seqs: list[WorkerSequence]  # the sequences that sample, in row order
    token_positions: list[int]  # where each sampled token goes in its sequence
    tokens_cpu: torch.Tensor  # [B_s] int64: on CPU the tokens; on CUDA filled by an async copy
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None  # CUDA: (started, done)
    logprobs: Logprobs | None
    shape: tuple[int, int, int] = (0, 0, 0)  # sequences, tokens, context tokens (for the trace)


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Start a device-to-host copy into pinned memory; valid once the step's event fires."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        block_size: int,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
        max_rows: int,
        parallel: ParallelContext = SINGLE_RANK,
        tracing: bool = False,  # fill ``last_trace`` (the step trace is on)
        grammars: GrammarCache | None = None,  # structured output's compiled constraints
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.graphs: list[StepGraphs] = []  # the worker captures them once this exists
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(0)  # row seeds of unseeded requests
        # The last step's sampled tokens, where the next step's inputs gather them on the device.
        self.prev_tokens = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self._tokens_out = PinnedRing(max_rows, torch.int64, pin=device.type == "cuda")
        self.grammars = grammars
        self._launched: LaunchedStep | None = None  # the last step launched
        self._last_rows: dict[int, int] = {}  # seq_id -> row of its token in prev_tokens
        self._last_done: torch.cuda.Event | None = None
        self.device_seconds = 0.0  # device busy time of collected steps (CUDA only)
        self.tracing = tracing
        self.last_trace: tuple[float, ...] = ()  # the collected step's shape, busy and idle ms
        self.wait_ms = 0.0  # how long the last collect() waited for the device

    @torch.inference_mode()
    def launch(
        self,
        step_id: int,
        seqs: list[WorkerSequence],
        num_new_tokens: list[int],
        table: SequenceTable,
    ) -> LaunchedStep:
        if all(n == 1 for n in num_new_tokens):
            seqs = longest_context_first(seqs)
        host = build_host_step(seqs, num_new_tokens, table, self.block_size, self._last_rows)
        sampling_seqs = [seqs[row] for row in host.sample_rows]
        if len(sampling_seqs) > len(self.prev_tokens):
            raise ValueError(
                f"{len(sampling_seqs)} sequences sample in one step: more than max_num_seqs "
                f"and max_num_batched_tokens allow ({len(self.prev_tokens)})"
            )
        sampling = build_sampling_input(
            sampling_seqs, self.vocab_size, self.eos_token_ids, self.rng
        )
        if sampling.adjusted_rows and self.parallel.is_driver:  # only rank 0 samples
            sampling = self._with_adjust(sampling, sampling_seqs)
        started = self._record_start()  # after the host's work: its preparation counts as idle
        tokens, logprobs = self._forward_and_sample(host, sampling, sampling_seqs)
        if sampling_seqs:
            tokens = self._keep_tokens(tokens)
        for seq, num_tokens in zip(seqs, num_new_tokens):
            seq.num_computed_tokens += num_tokens
        shape = (0, 0, 0)
        if self.tracing:
            context = sum(seq.num_computed_tokens for seq in seqs)
            shape = (len(seqs), host.num_tokens, context)
        positions = [len(seq.token_ids) for seq in sampling_seqs]
        for seq in sampling_seqs:
            seq.token_ids.append(PENDING)
        if sampling_seqs:
            self._last_rows = {seq.seq_id: row for row, seq in enumerate(sampling_seqs)}
        out = self._copy_out(step_id, sampling_seqs, positions, tokens, logprobs, started, shape)
        self._launched = out
        return out

    def _with_adjust(
        self, sampling: SamplingInput[np.ndarray], seqs: list[WorkerSequence]
    ) -> SamplingInput[np.ndarray]:
        """``sampling`` with its adjusted rows' arrays on the device, in one copy, their pending
        tokens read from ``prev_tokens`` now: before this step's forward overwrites them."""
        rows = list(sampling.adjusted_rows)
        host = build_adjust_arrays(seqs, rows, self.vocab_size, self._last_rows)
        arrays = unpack(AdjustArrays, pack(named(host), self.device))
        return sampling.with_adjust(resolve_pending(arrays, self.prev_tokens))

    def _record_start(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        return started

    def _keep_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's tokens on every rank, and in ``prev_tokens`` for the next step's inputs."""
        tokens = broadcast(tokens, self.parallel)
        if tokens.data_ptr() != self.prev_tokens.data_ptr():  # else the graph put them there
            self.prev_tokens[: len(tokens)].copy_(tokens)
        return tokens

    def _with_grammar(
        self, sampling: SamplingInput[torch.Tensor], seqs: list[WorkerSequence]
    ) -> SamplingInput[torch.Tensor]:
        """``sampling`` with its constrained rows' grammar mask on the device. Their newest
        tokens may still be in flight (async scheduling): the previous step's are read first,
        waiting for it, while this step's forward, queued behind it, keeps the device busy."""
        rows = sampling.constrained_rows
        previous = self._launched
        if previous is not None and any(seqs[row].token_ids[-1] == PENDING for row in rows):
            if previous.events is not None:
                previous.events[1].synchronize()
            self._write_tokens(previous)
        assert self.grammars is not None, "a constrained sequence on a worker without grammars"
        mask = build_grammar_mask(seqs, rows, self.grammars)
        host = {"rows": mask.rows.numpy(), "bitmask": mask.bitmask.numpy()}
        return sampling.with_grammar(unpack(GrammarMask, pack(host, self.device)))

    def _forward_and_sample(
        self, host: HostStep, sampling: SamplingInput[np.ndarray], seqs: list[WorkerSequence]
    ) -> tuple[torch.Tensor, Logprobs | None]:
        """Queue the forward and the draw: the tokens [B_s] (on other ranks than 0, a buffer for
        rank 0's) and, if asked for, their logprobs."""
        tokens: torch.Tensor | None = None
        for graphs in self.graphs:
            bucket = graphs.fitting_bucket(host, sampling)
            if bucket is not None:  # drawn in the graph
                tokens, logits, sampling_gpu = graphs.run(bucket, host, sampling)
                break
        else:
            logits, sampling_gpu = self._run_eager(host, sampling)
        if logits is not None:
            if sampling.constrained_rows:
                sampling_gpu = self._with_grammar(sampling_gpu, seqs)
            if tokens is None or sampling.needs_more_than_the_kernel:
                tokens = sample(logits, sampling_gpu)  # [B_s]
        elif tokens is None:
            tokens = torch.empty(len(host.sample_rows), dtype=torch.int64, device=self.device)
        logprobs = None
        if logits is not None and sampling.num_top:
            logprobs = compute_logprobs(logits, tokens, sampling.num_top)
        return tokens, logprobs

    def _run_eager(
        self, host: HostStep, sampling: SamplingInput[np.ndarray]
    ) -> tuple[torch.Tensor | None, SamplingInput[torch.Tensor]]:
        """A step outside the graphs, on one packed copy of its arrays: the logits of its sampling
        rows ([B_s, V] on rank 0; None elsewhere or when no row samples) and its sampling input
        on the device."""
        x, sampling_arrays = pack_step(host.arrays, sampling.arrays, self.device)
        prev_rows = x.prev_rows if host.num_pending else None  # None: no id to resolve
        meta = AttentionMetadata(
            slot_mapping=x.slot_mapping,
            cu_seqlens_q=x.cu_seqlens_q,
            seq_lens=x.seq_lens,
            block_tables=x.block_tables,
            max_seqlen_q=host.max_seqlen_q,
            max_seqlen_k=host.max_seqlen_k,
            is_decode=host.is_decode,
            is_plain_prefill=host.is_plain_prefill,
        )
        hidden = self.model(x.input_ids, x.positions, meta, prev_rows, self.prev_tokens)
        logits = None
        if host.sample_rows:
            if host.num_tokens != len(host.sample_rows):
                hidden = hidden[x.last_token_indices]
            logits = self.model.compute_logits(hidden)
        return logits, sampling.on(sampling_arrays)

    def _copy_out(
        self,
        step_id: int,
        seqs: list[WorkerSequence],
        positions: list[int],
        tokens: torch.Tensor,
        logprobs: Logprobs | None,
        started: torch.cuda.Event | None,
        shape: tuple[int, int, int],
    ) -> LaunchedStep:
        if started is None:  # on CPU the tokens are already there
            return LaunchedStep(step_id, seqs, positions, tokens, None, logprobs, shape)
        tokens_cpu = self._tokens_out.copy(tokens)
        if logprobs is not None:
            sampled, top_ids, top_lps = (_pinned_copy(t) for t in logprobs)
            logprobs = sampled, top_ids, top_lps
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        events = (started, done)
        return LaunchedStep(step_id, seqs, positions, tokens_cpu, events, logprobs, shape)

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step and write its tokens into the sequences."""
        self.wait_ms = 0.0
        if step.events is not None:
            start = time.perf_counter_ns()
            step.events[1].synchronize()
            self.wait_ms = (time.perf_counter_ns() - start) / 1e6
            self._account_device_time(step.shape, *step.events)
        elif self.tracing:  # no device events on CPU: the step's shape only
            self.last_trace = (*step.shape, 0.0, 0.0)
        token_ids = self._write_tokens(step)
        logprobs = None
        if step.logprobs is not None:
            logprobs = logprob_lists(step.seqs, token_ids, *step.logprobs)
        return StepResult(step.step_id, [s.seq_id for s in step.seqs], token_ids, logprobs)

    @staticmethod
    def _write_tokens(step: LaunchedStep) -> list[int]:
        """Write a finished step's tokens into its sequences (again is harmless); its tokens."""
        token_ids = step.tokens_cpu.tolist()
        for seq, position, token_id in zip(step.seqs, step.token_positions, token_ids):
            seq.token_ids[position] = token_id
        return token_ids

    def _account_device_time(
        self, shape: tuple[int, int, int], started: torch.cuda.Event, done: torch.cuda.Event
    ) -> None:
        """Add the time the device spent on this step (not the time it sat queued behind the
        previous one) to ``device_seconds``."""
        busy_ms = started.elapsed_time(done)
        idle_ms = 0.0
        if self._last_done is not None:
            busy_ms = min(busy_ms, self._last_done.elapsed_time(done))
            idle_ms = max(0.0, self._last_done.elapsed_time(started))
        self._last_done = done
        self.device_seconds += busy_ms / 1e3
        if self.tracing:
            self.last_trace = (*shape, busy_ms, idle_ms)
