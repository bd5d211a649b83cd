"""The worker's memory of each sequence, kept across steps so plans only carry deltas.

Applying a plan here is the only way this state changes; the tokens a worker samples are appended
by the model runner, so they never travel back down from the scheduler.

Block tables live in one numpy array, a row per live sequence (``WorkerSequence.row``), so a
step's tables are one fancy-indexing read instead of a Python loop over lists. The array grows
(rows, columns) when it must; a finished sequence's row is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from protos.sampling_params import SamplingParams
from protos.step_plan import StepPlan

if TYPE_CHECKING:
    from worker_service.grammars import SequenceGrammar

# A sequence's sampling settings as one numpy record, so a step gathers its rows' settings with one
# array build instead of a pass per setting (worker_service/sampling.py).
PARAMS_DTYPE = np.dtype(
    [
        ("temperature", np.float32),
        ("top_k", np.int64),
        ("top_p", np.float32),
        ("min_p", np.float32),
        ("has_seed", np.bool_),
        ("seed", np.int64),
        ("min_tokens", np.int64),
        ("logprobs", np.int64),
        ("adjusts_logits", np.bool_),  # a penalty or a logit bias (worker_service/logit_adjust.py)
        ("constrained", np.bool_),  # structured output (worker_service/grammar_mask.py)
    ]
)


@dataclass
class WorkerSequence:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    row: int  # this sequence's row in SequenceTable.block_tables
    num_blocks: int  # the first num_blocks entries of its row are its block table
    num_computed_tokens: int
    # Its constraint's matcher (rank 0 only), made at its first constrained draw; it outlives
    # preemptions, as the tokens do.
    grammar: SequenceGrammar | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @cached_property
    def prompt_token_set(self) -> np.ndarray:
        """Its prompt's distinct token ids, int64 (what a repetition penalty looks at; the prompt
        never changes)."""
        return np.unique(np.asarray(self.token_ids[: self.num_prompt_tokens], dtype=np.int64))

    @cached_property
    def params_record(self) -> tuple[float, int, float, float, bool, int, int, int, bool, bool]:
        """``params`` as a ``PARAMS_DTYPE`` record (they never change for a sequence)."""
        p = self.params
        seed = p.seed if p.seed is not None else 0
        return (
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.seed is not None,
            seed,
            p.min_tokens,
            p.logprobs,
            p.adjusts_logits,
            p.constraint is not None,
        )


class SequenceTable:
    def __init__(self, rows: int = 64, blocks_per_seq: int = 16) -> None:
        self.seqs: dict[int, WorkerSequence] = {}
        self.block_tables = np.zeros((rows, blocks_per_seq), dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.seqs)

    def clear(self) -> None:
        self.seqs.clear()
        self._free_rows = list(range(len(self.block_tables) - 1, -1, -1))

    def block_table(self, seq: WorkerSequence) -> list[int]:
        return self.block_tables[seq.row, : seq.num_blocks].tolist()

    def apply(self, plan: StepPlan) -> list[WorkerSequence]:
        """Apply the plan's deltas; return the scheduled sequences in batch order."""
        for seq_id in plan.finished_seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self._free_rows.append(seq.row)
        for seq_id in plan.preempted_seq_ids:
            seq = self.seqs[seq_id]
            seq.num_blocks = 0
            seq.num_computed_tokens = 0
        for new in plan.new_seqs:
            if new.seq_id in self.seqs:  # a plan that repeats a live id: reuse its row
                self._free_rows.append(self.seqs[new.seq_id].row)
            seq = WorkerSequence(
                new.seq_id,
                list(new.prompt_token_ids),
                len(new.prompt_token_ids),
                new.params,
                self._take_row(),
                0,
                new.num_computed_tokens,
            )
            self.seqs[new.seq_id] = seq
            self._write_blocks(seq, new.block_ids)
        for resumed in plan.resumed_seqs:
            seq = self.seqs[resumed.seq_id]
            seq.num_blocks = 0
            seq.num_computed_tokens = resumed.num_computed_tokens
            self._write_blocks(seq, resumed.block_ids)
        for seq_id, block_ids in zip(plan.appended_seq_ids, plan.appended_block_ids):
            self._write_blocks(self.seqs[seq_id], block_ids)
        return [self.seqs[seq_id] for seq_id in plan.seq_ids]

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = len(self.block_tables)
            self.block_tables = np.concatenate(
                [self.block_tables, np.zeros_like(self.block_tables)]
            )
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _write_blocks(self, seq: WorkerSequence, block_ids) -> None:
        """Append ``block_ids`` to ``seq``'s block table."""
        n = len(block_ids)
        if not n:
            return
        end = seq.num_blocks + n
        if end > self.block_tables.shape[1]:
            grow = max(end, 2 * self.block_tables.shape[1]) - self.block_tables.shape[1]
            self.block_tables = np.pad(self.block_tables, ((0, 0), (0, grow)))
        self.block_tables[seq.row, seq.num_blocks : end] = block_ids
        seq.num_blocks = end
