"""A sequence: one request's tokens and its place in the KV cache, as the scheduler sees it."""

from __future__ import annotations

from collections import deque
from enum import Enum, auto

from protos.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Prompt + output token ids, how many of them have KV in the cache, and the block table.

    Invariant while RUNNING: ``len(block_table) * block_size >= num_computed_tokens``, and the
    first ``num_computed_tokens`` tokens have their K/V stored in the blocks of ``block_table``.
    """

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache at admission
        self.num_preemptions = 0
        # Async scheduling: positions of tokens sampled by steps whose results are not back yet
        # (their value in token_ids is PENDING until then), oldest first.
        self.pending_positions: deque[int] = deque()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known_output_tokens(self) -> int:
        """Output tokens whose values are back (excludes those still in flight)."""
        return self.num_output_tokens - len(self.pending_positions)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def block_token_ids(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size : (index + 1) * block_size]
