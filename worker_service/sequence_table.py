"""The worker's memory of each sequence, kept across steps so plans only carry deltas.

Applying a plan here is the only way this state changes; the tokens a worker samples are appended
by the model runner, so they never travel back down from the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_service.sampling_params import SamplingParams
from scheduler_service.step_plan import StepPlan


@dataclass
class WorkerSequence:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_table: list[int]
    num_computed_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class SequenceTable:
    def __init__(self) -> None:
        self.seqs: dict[int, WorkerSequence] = {}

    def __len__(self) -> int:
        return len(self.seqs)

    def clear(self) -> None:
        self.seqs.clear()

    def apply(self, plan: StepPlan) -> list[WorkerSequence]:
        """Apply the plan's deltas; return the scheduled sequences in batch order."""
        for seq_id in plan.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for seq_id in plan.preempted_seq_ids:
            seq = self.seqs[seq_id]
            seq.block_table = []
            seq.num_computed_tokens = 0
        for new in plan.new_seqs:
            self.seqs[new.seq_id] = WorkerSequence(
                new.seq_id,
                list(new.prompt_token_ids),
                len(new.prompt_token_ids),
                new.params,
                list(new.block_ids),
                new.num_computed_tokens,
            )
        for resumed in plan.resumed_seqs:
            seq = self.seqs[resumed.seq_id]
            seq.block_table = list(resumed.block_ids)
            seq.num_computed_tokens = resumed.num_computed_tokens
        for seq_id, block_ids in zip(plan.appended_seq_ids, plan.appended_block_ids):
            self.seqs[seq_id].block_table.extend(block_ids)
        return [self.seqs[seq_id] for seq_id in plan.seq_ids]
