"""ModelRunner: runs one step of the model on prepared inputs and samples, without waiting.

``launch`` queues the forward pass and sampling on the device and returns at once; ``collect``
waits for that step's tokens and writes them into the sequences. Between the two the host is free
to prepare the next step, whose inputs read this step's tokens straight from the device
(``prev_tokens``, where every step leaves its sampled tokens). That is what lets the scheduler run
one step ahead (async scheduling). A decode step whose batch fits a CUDA graph runs as one replay
(worker_service/cuda_graphs.py); other steps run eagerly on packed inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from models.parallel import SINGLE_RANK, ParallelContext, broadcast
from models.qwen3 import Qwen3ForCausalLM
from protos.step_plan import StepResult
from worker_service.batch_inputs import PENDING, HostStep, build_host_step, pack
from worker_service.cuda_graphs import DecodeGraphs
from worker_service.sampler import HostSampling, SamplingBatch, compute_logprobs, sample
from worker_service.sequence_table import SequenceTable, WorkerSequence


@dataclass
class LaunchedStep:
    """A step queued on the device: whose tokens it samples and where they will land."""

    step_id: int
    seqs: list[WorkerSequence]  # the sequences that sample, in row order
    token_positions: list[int]  # where each sampled token goes in its sequence
    tokens_cpu: torch.Tensor  # [B_s] int64: on CPU the tokens; on CUDA filled by an async copy
    done: torch.cuda.Event | None
    started: torch.cuda.Event | None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
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
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.graphs: DecodeGraphs | None = None  # the worker captures them once this exists
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device)  # the torch sampler's noise
        self.generator.manual_seed(0)
        self.rng = np.random.default_rng(0)  # the sampling kernel's per-row streams
        # The last step's sampled tokens, where the next step's inputs gather them on the device.
        self.prev_tokens = torch.zeros(max_rows, dtype=torch.int64, device=device)
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
        host = build_host_step(seqs, num_new_tokens, table, self.block_size, self._last_rows)
        sampling_seqs = [seqs[row] for row in host.sample_rows]
        if len(sampling_seqs) > len(self.prev_tokens):
            raise ValueError(
                f"{len(sampling_seqs)} sequences sample in one step: more than max_num_seqs "
                f"and max_num_batched_tokens allow ({len(self.prev_tokens)})"
            )
        sampling = HostSampling.of(sampling_seqs, self.rng)
        started = None  # after the host's work: its time preparing them counts as idle
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        graphs = self.graphs
        tokens = None
        if (
            graphs is not None
            and graphs.can_run(host, len(seqs))
            and host.num_tokens == len(sampling_seqs)
        ):
            tokens, logits = graphs.run(host, sampling)  # sampled by the kernel in the graph
            resample = sampling.needs_torch
        else:
            logits = self._run_eager(host, len(sampling_seqs), sampling)
            resample = True
        logprobs = None
        if logits is not None:  # rank 0, with rows to sample
            logits = self._masked(logits, sampling_seqs, sampling)
            if resample:
                batch = SamplingBatch.from_host(sampling_seqs, sampling, self.vocab_size)
                tokens = sample(logits, batch, self.generator)  # [B_s]
            if sampling.num_top:
                logprobs = compute_logprobs(logits, tokens, sampling.num_top)
        if tokens is None:  # another rank samples; this one receives its tokens below
            tokens = torch.empty(len(sampling_seqs), dtype=torch.int64, device=self.device)
        if sampling_seqs:
            tokens = broadcast(tokens, self.parallel)  # every rank feeds them into its next step
            if tokens.data_ptr() != self.prev_tokens.data_ptr():  # else the graph put them there
                self.prev_tokens[: len(tokens)].copy_(tokens)
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
        return self._copy_out(step_id, sampling_seqs, positions, tokens, logprobs, started, shape)

    def _run_eager(
        self, host: HostStep, num_sampling: int, sampling: HostSampling
    ) -> torch.Tensor | None:
        """A step outside the graphs: packed inputs, forward, and the logits of the sampling rows
        ([B_s, V] on rank 0; None elsewhere or when no row samples)."""
        arrays = dict(host.arrays, temperatures=sampling.temperatures, seeds=sampling.seeds)
        x = pack(arrays, self.device)
        sampling.temperatures_dev, sampling.seeds_dev = x["temperatures"], x["seeds"]
        input_ids = x["input_ids"]
        if host.num_pending:
            prev = x["prev_rows"]
            input_ids = torch.where(prev >= 0, self.prev_tokens[prev.clamp(min=0)], input_ids)
        meta = AttentionMetadata(
            slot_mapping=x["slot_mapping"],
            cu_seqlens_q=x["cu_seqlens_q"],
            seq_lens=x["seq_lens"],
            block_tables=x["block_tables"],
            max_seqlen_q=host.max_seqlen_q,
            max_seqlen_k=host.max_seqlen_k,
            is_decode=host.is_decode,
            is_plain_prefill=host.is_plain_prefill,
        )
        hidden = self.model(input_ids, x["positions"], meta)  # [T, hidden]
        if not num_sampling:
            return None
        if host.num_tokens != num_sampling:
            hidden = hidden[x["last_token_indices"]]
        return self.model.compute_logits(hidden)

    def _copy_out(self, step_id, seqs, positions, tokens, logprobs, started, shape) -> LaunchedStep:
        if self.device.type != "cuda":
            return LaunchedStep(step_id, seqs, positions, tokens, None, None, logprobs, shape)
        tokens_cpu = _pinned_copy(tokens)
        if logprobs is not None:
            logprobs = tuple(_pinned_copy(t) for t in logprobs)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return LaunchedStep(step_id, seqs, positions, tokens_cpu, done, started, logprobs, shape)

    def collect(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step and write its tokens into the sequences."""
        self.wait_ms = 0.0
        if step.done is not None:
            start = time.perf_counter_ns()
            step.done.synchronize()
            self.wait_ms = (time.perf_counter_ns() - start) / 1e6
            self._account_device_time(step)
        elif self.tracing:  # no device events on CPU: the step's shape only
            self.last_trace = (*step.shape, 0.0, 0.0)
        token_ids = step.tokens_cpu.tolist()
        for seq, position, token_id in zip(step.seqs, step.token_positions, token_ids):
            seq.token_ids[position] = token_id
        logprobs = None
        if step.logprobs is not None:
            logprobs = self._logprob_lists(step.seqs, token_ids, *step.logprobs)
        return StepResult(step.step_id, [s.seq_id for s in step.seqs], token_ids, logprobs)

    def _account_device_time(self, step: LaunchedStep) -> None:
        """Add the time the device spent on this step (not the time it sat queued behind the
        previous one) to ``device_seconds``."""
        busy_ms = step.started.elapsed_time(step.done)
        idle_ms = 0.0
        if self._last_done is not None:
            busy_ms = min(busy_ms, self._last_done.elapsed_time(step.done))
            idle_ms = max(0.0, self._last_done.elapsed_time(step.started))
        self._last_done = step.done
        self.device_seconds += busy_ms / 1e3
        if self.tracing:
            self.last_trace = (*step.shape, busy_ms, idle_ms)

    def _masked(
        self, logits: torch.Tensor, seqs: list[WorkerSequence], sampling: HostSampling
    ) -> torch.Tensor:
        """Until min_tokens are out, EOS and stop token ids cannot be sampled."""
        if not sampling.masked_rows:
            return logits
        logits = logits.clone()
        for row in sampling.masked_rows:
            params = seqs[row].params
            banned = set(params.stop_token_ids)
            if not params.ignore_eos:
                banned |= set(self.eos_token_ids)
            if banned:
                logits[row, sorted(banned)] = float("-inf")
        return logits

    @staticmethod
    def _logprob_lists(seqs, token_ids, sampled, top_ids, top_lps) -> list[list[tuple[int, float]]]:
        """Per sampled row: (sampled id, logprob) first, then the top-n (id, logprob) pairs."""
        out = []
        sampled_list, ids_list, lps_list = sampled.tolist(), top_ids.tolist(), top_lps.tolist()
        for row, seq in enumerate(seqs):
            n = seq.params.logprobs
            pairs = [(token_ids[row], sampled_list[row])]
            pairs += list(zip(ids_list[row][:n], lps_list[row][:n]))
            out.append(pairs)
        return out
