"""Worker: loads the model shard, owns the KV cache, executes step plans.

The same class serves the offline ``LLM`` (called in-process) and the gRPC worker service (wrapped
by its servicer). It never decides scheduling or allocation.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path

import torch

from models.config import ModelConfig
from models.layers.attention import AttentionMetadata
from models.loader import load_model
from models.parallel import ParallelContext
from models.qwen3 import Qwen3ForCausalLM
from protos.sampling_params import Constraint
from protos.step_plan import StepPlan, StepResult, WorkerInfo
from protos.step_trace import StepTrace, ms_since
from worker_service.attention_backends import select_backend
from worker_service.config import WorkerConfig
from worker_service.cuda_graphs import StepGraphs
from worker_service.decode_graphs import DecodeGraphs
from worker_service.grammars import GrammarCache
from worker_service.kv_cache import allocate_kv_cache, bytes_per_block
from worker_service.model_runner import LaunchedStep, ModelRunner
from worker_service.prefill_graphs import prefill_graph_kinds
from worker_service.sequence_table import SequenceTable

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """``auto`` is float32 on CPU; on GPU the checkpoint's half type, else bfloat16."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is invalid: must be auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@torch.inference_mode()
def warm_up_forward(
    model: Qwen3ForCausalLM,
    num_tokens: int,
    max_model_len: int,
    max_num_seqs: int,
    device: torch.device,
) -> None:
    """A plain prefill of ``num_tokens`` tokens (no cache bound yet) plus logits for a full batch."""
    seq_len = min(num_tokens, max_model_len)
    num_seqs = max(1, num_tokens // seq_len)
    lens = [seq_len] * num_seqs
    cu = torch.tensor(
        [0] + [seq_len * (i + 1) for i in range(num_seqs)], dtype=torch.int32, device=device
    )
    total = seq_len * num_seqs
    meta = AttentionMetadata(
        slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=device),
        cu_seqlens_q=cu,
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32, device=device),
        max_seqlen_q=seq_len,
        max_seqlen_k=seq_len,
        is_decode=False,
        is_plain_prefill=True,
    )
    ids = torch.zeros(total, dtype=torch.int64, device=device)
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    hidden = model(ids, positions, meta)
    rows = min(max_num_seqs, total)
    logits = model.compute_logits(hidden[:rows])
    if logits is not None:
        logits.float().softmax(-1).sort(dim=-1, descending=True)


MEMORY_REFRESH_S = 0.25  # how stale the memory a step reports may be


class Worker:
    def __init__(self, config: WorkerConfig, trace: StepTrace | None = None) -> None:
        """``trace``: where each step's timing goes (benchmarks: rank 0's); its owner closes it."""
        self.config = config
        self.trace = trace
        self._memory, self._memory_read_at = 0, -MEMORY_REFRESH_S
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", config.rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(self.device)
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config.dtype)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.backend = select_backend(
            self.device, config.attention_backend, self.max_model_len, config.max_num_seqs
        )
        parallel = ParallelContext(rank=config.rank, world_size=config.world_size)
        self.model = load_model(config.model_dir, self.backend, self.dtype, self.device, parallel)
        self.num_kv_blocks = self._num_kv_blocks()
        self.kv_cache = allocate_kv_cache(
            self.model,
            self.model_config,
            self.num_kv_blocks,
            config.block_size,
            self.dtype,
            self.device,
            config.world_size,
        )
        self.grammars = GrammarCache(
            config.model_dir, self.model_config.vocab_size, self.model_config.eos_token_ids
        )
        self.grammars.start_compiler()
        self.runner = ModelRunner(
            self.model,
            config.block_size,
            self.device,
            self.model_config.eos_token_ids,
            self.model_config.vocab_size,
            max(config.max_num_seqs, config.max_num_batched_tokens),
            parallel,
            tracing=trace is not None,
            grammars=self.grammars,
        )
        self.runner.graphs = self._capture_graphs()
        self.seqs = SequenceTable(config.max_num_seqs, self._max_blocks_per_seq())
        self._last_return_ns = 0
        self._in_flight: LaunchedStep | None = None  # a deferred step not yet answered
        self._answers: deque[StepResult] = deque()  # submit()ted plans' answers, for receive()
        log.info(
            "worker ready: %s on %s (%s), attention=%s, %d KV blocks of %d tokens",
            config.model_dir,
            self.device,
            self.dtype,
            self.backend.name,
            self.num_kv_blocks,
            config.block_size,
        )

    def _bind_device(self) -> None:
        """Make this rank's GPU current in the calling thread (gRPC runs steps on pool threads,
        whose current device is cuda:0; events, streams and Triton launches follow it)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = bytes_per_block(
            self.model_config,
            self.config.block_size,
            self.dtype,
            self.config.world_size,
        )
        if self.config.kv_cache_gb is not None or self.device.type == "cpu":
            budget = (self.config.kv_cache_gb or 1.0) * 2**30
        else:
            budget = self._profile_free_gpu_memory()
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({budget / 2**30:.2f} GB) holds no block")
        return num_blocks

    def _profile_free_gpu_memory(self) -> float:
        """GPU bytes left for the cache: utilization x total, minus what is in use, minus the
        activation peak of a warm-up forward of ``max_num_batched_tokens`` tokens."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        warm_up_forward(
            self.model,
            self.config.max_num_batched_tokens,
            self.max_model_len,
            self.config.max_num_seqs,
            self.device,
        )
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        peak = torch.cuda.max_memory_allocated()
        current = torch.cuda.memory_allocated()
        torch.cuda.empty_cache()
        return total * self.config.gpu_memory_utilization - used - peak + current

    def _capture_graphs(self) -> list[StepGraphs]:
        """Decode graphs, then prefill graphs (if the backend's prefill can be captured) in the
        same memory pool."""
        cfg, device, prev = self.config, self.device, self.runner.prev_tokens
        if device.type != "cuda" or cfg.enforce_eager or self.backend.name == "torch":
            return []
        blocks, seqs = self._max_blocks_per_seq(), cfg.max_num_seqs
        graphs: list[StepGraphs] = [DecodeGraphs(self.model, seqs, blocks, prev, device)]
        tokens = min(cfg.max_num_batched_tokens, cfg.max_prefill_graph_tokens)
        if self.backend.captures_prefill and tokens:
            graphs += prefill_graph_kinds(self.model, seqs, tokens, blocks, prev, device)
        pool = None
        for kind in graphs:
            pool = kind.capture(pool)
            log.info("captured %s CUDA graphs for %s", kind.kind, kind.buckets)
        return graphs

    def _max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.block_size)

    def describe(self) -> WorkerInfo:
        return WorkerInfo(
            model_path=str(Path(self.config.model_dir).resolve()),
            model_name=Path(self.config.model_dir).resolve().name,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.model_config.eos_token_ids,
            block_size=self.config.block_size,
            num_kv_blocks=self.num_kv_blocks,
            dtype=str(self.dtype).removeprefix("torch."),
            attention_backend=self.backend.name,
            device=str(self.device),
            rank=self.config.rank,
            world_size=self.config.world_size,
        )

    def memory_bytes(self) -> int:
        """Memory this rank holds: device memory allocated on a GPU, resident set on CPU. Read
        again at most every MEMORY_REFRESH_S: every step reports it, and on a GPU reading it
        (the allocator's whole statistics dict) cost a fifth of a batch-1 decode step's host time."""
        now = time.monotonic()
        if now - self._memory_read_at >= MEMORY_REFRESH_S:
            self._memory_read_at = now
            if self.device.type == "cuda":
                self._memory = torch.cuda.memory_allocated(self.device)
            else:
                with open("/proc/self/statm") as statm:
                    self._memory = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return self._memory

    def check_constraint(self, constraint: Constraint) -> str:
        """Compile ``constraint`` now (cached for its sequences): the compiler's message, or ""."""
        return self.grammars.error(constraint)

    def start_session(self) -> None:
        """A new scheduler session: forget every sequence (cache contents are never trusted)."""
        self._bind_device()
        if self._in_flight is not None:
            self.runner.collect(self._in_flight)
            self._in_flight = None
        self.seqs.clear()
        self._answers.clear()

    def step(self, plan: StepPlan) -> StepResult:
        """Run a plan. With ``defer_result`` return the previous deferred plan's result instead."""
        start = time.perf_counter_ns()
        self._bind_device()
        scheduled = self.seqs.apply(plan)
        launched = None
        if scheduled:
            launched = self.runner.launch(plan.step_id, scheduled, plan.num_new_tokens, self.seqs)
        if plan.defer_result:
            launched, self._in_flight = self._in_flight, launched
        prepared = time.perf_counter_ns()
        result = StepResult(-1, [], []) if launched is None else self.runner.collect(launched)
        if self.trace is not None:
            self._trace_step(self.trace, start, prepared, launched is not None)
        return result

    def _trace_step(
        self, trace: StepTrace, start_ns: int, prepared_ns: int, collected: bool
    ) -> None:
        runner = self.runner
        if self._last_return_ns:
            trace.note("gap", (start_ns - self._last_return_ns) / 1e6)
        trace.note("prep", (prepared_ns - start_ns) / 1e6)
        if collected:
            trace.note("wait", runner.wait_ms)
            trace.note("collect", ms_since(prepared_ns) - runner.wait_ms)
        if runner.last_trace:
            trace.add(*runner.last_trace)
            runner.last_trace = ()
        self._last_return_ns = time.perf_counter_ns()

    # The engine's in-process WorkerClient: each plan runs as it is submitted.
    def submit(self, plan: StepPlan) -> None:
        self._answers.append(self.step(plan))

    def receive(self) -> StepResult:
        return self._answers.popleft()
