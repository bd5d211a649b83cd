"""PlanBuilder: turns the scheduler's decisions into delta step plans (protos/step_plan.py).

It remembers what the workers already hold (which sequences, how many of their blocks), so a
sequence's prompt, parameters and block table go over the wire once and later plans carry deltas.
"""

from __future__ import annotations

from protos.step_plan import NewSequence, ResumedSequence, StepPlan
from scheduler_service.scheduler import ScheduledBatch
from scheduler_service.sequence import Sequence


class PlanBuilder:
    """Turns scheduling decisions into delta plans, remembering what the worker already knows."""

    def __init__(self) -> None:
        self._num_sent_blocks: dict[int, int] = {}  # seq_id -> blocks the worker holds
        self._known_seq_ids: set[int] = set()
        self._pending_finished: list[int] = []
        self._next_step_id = 0

    def finished(self, seq_id: int) -> None:
        """Tell the worker to forget ``seq_id`` in the next plan (if it ever saw it)."""
        self._num_sent_blocks.pop(seq_id, None)
        if seq_id in self._known_seq_ids:
            self._known_seq_ids.discard(seq_id)
            self._pending_finished.append(seq_id)

    def build(self, batch: ScheduledBatch) -> StepPlan:
        plan = StepPlan(step_id=self._next_step_id, finished_seq_ids=self._pending_finished)
        self._next_step_id += 1
        self._pending_finished = []
        for seq in batch.preempted:
            if seq.seq_id in self._num_sent_blocks:
                plan.preempted_seq_ids.append(seq.seq_id)
                del self._num_sent_blocks[seq.seq_id]
        for seq, num_tokens in zip(batch.seqs, batch.num_new_tokens):
            self._add_seq_delta(plan, seq)
            plan.seq_ids.append(seq.seq_id)
            plan.num_new_tokens.append(num_tokens)
        return plan

    def _add_seq_delta(self, plan: StepPlan, seq: Sequence) -> None:
        num_sent = self._num_sent_blocks.get(seq.seq_id)
        table = seq.block_table
        if seq.seq_id not in self._known_seq_ids:
            self._known_seq_ids.add(seq.seq_id)
            plan.new_seqs.append(
                NewSequence(
                    seq.seq_id,
                    seq.token_ids[:],
                    seq.params,
                    table[:],
                    seq.num_computed_tokens,
                )
            )
        elif num_sent is None:
            plan.resumed_seqs.append(ResumedSequence(seq.seq_id, table[:], seq.num_computed_tokens))
        elif len(table) > num_sent:
            plan.appended_seq_ids.append(seq.seq_id)
            plan.appended_block_ids.append(table[num_sent:])
        self._num_sent_blocks[seq.seq_id] = len(table)
