"""The scheduling policy: which sequences compute how many tokens in the next step.

Continuous batching under two budgets, ``max_num_seqs`` and ``max_num_batched_tokens``:
1. Running sequences first, decodes before unfinished (chunked) prefills, so a flood of new
   prompts never starves decode. Each gets its next tokens' slots; when the cache cannot hold
   them, the most recently admitted running sequence is preempted (blocks freed, sent back to the
   front of the waiting queue, recomputed later) until it can.
2. Then waiting sequences in arrival order (FCFS), while budget, sequence slots and blocks last.
   A prompt longer than the remaining token budget is split across steps (chunked prefill).
No new sequence is admitted in a step that preempted one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protos.step_plan import PENDING
from scheduler_service.block_manager import BlockManager
from scheduler_service.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 256
    num_kv_blocks: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} is invalid: must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is invalid: "
                f"must be >= max_num_seqs ({self.max_num_seqs})"
            )


@dataclass
class ScheduledBatch:
    """One step's decision: (sequence, number of tokens it computes), in batch order."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted:  # else the victim could come straight back on prefix-cache hits
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0 or seq.status != SequenceStatus.RUNNING:
                continue  # out of budget, or preempted earlier in this loop
            if seq.num_output_tokens >= seq.params.max_tokens:
                continue  # its last token is in flight (async scheduling): nothing left to do
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_tokens, batch):
                break  # seq itself was preempted; everything after it already was
            batch.add(seq, num_tokens)
            budget -= num_tokens
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt from the newest admission until ``seq`` has slots; False if seq was preempted."""
        while not self.block_manager.ensure_slots(seq, num_tokens):
            victim = self.running[-1]
            assert victim not in batch.seqs, "a scheduled sequence cannot be preempted"
            self.preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.pending_positions or not self.block_manager.allocate(seq):
                break  # a preempted sequence waits for its in-flight token before recomputing
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            batch.add(seq, num_tokens)
            budget -= num_tokens

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def on_step_launched(self, batch: ScheduledBatch) -> None:
        """Count the batch's tokens as computed (the worker runs steps in order, so the next plan
        may build on them), and give each sequence that reaches its end a PENDING next token."""
        for seq, num_tokens in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.pending_positions.append(seq.num_tokens)
                seq.token_ids.append(PENDING)
            if not seq.pending_positions or seq.pending_positions[0] >= seq.num_computed_tokens:
                self.block_manager.commit(seq)  # every computed token is known: hash full blocks

    def on_token(self, seq: Sequence, token_id: int) -> None:
        """The value of ``seq``'s oldest in-flight token came back."""
        seq.token_ids[seq.pending_positions.popleft()] = token_id
        self.block_manager.commit(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (stopped or aborted) wherever it is, and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        self.block_manager.forget(seq)
