"""The step protocol as domain objects: what the scheduler tells a worker each step.

Each thing goes over the wire once. A new sequence's prompt, sampling parameters and block table
are sent in the step that first schedules it; after that a step carries only deltas (appended
block ids, a fresh table for a resumed sequence, finished ids) and how many tokens each scheduled
sequence computes. The worker keeps the tokens it sampled, so outputs never travel back down.
These classes are the wire format's meaning; ``*_pb2`` conversion happens at the gRPC edge only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.sampling_params import SamplingParams

PENDING = -1  # a sampled token whose value has not come back yet (scheduler and worker alike)


@dataclass
class NewSequence:
    """A sequence the worker has not seen: everything it needs, once."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hit: tokens whose K/V are already in these blocks


@dataclass
class ResumedSequence:
    """A preempted sequence coming back: a fresh block table; the worker kept its tokens."""

    seq_id: int
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class StepPlan:
    step_id: int
    new_seqs: list[NewSequence] = field(default_factory=list)
    resumed_seqs: list[ResumedSequence] = field(default_factory=list)
    appended_seq_ids: list[int] = field(default_factory=list)  # parallel to appended_block_ids
    appended_block_ids: list[list[int]] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)  # drop block table, keep tokens
    finished_seq_ids: list[int] = field(default_factory=list)  # forget entirely
    seq_ids: list[int] = field(default_factory=list)  # scheduled, in batch order
    num_new_tokens: list[int] = field(default_factory=list)  # parallel to seq_ids
    # Async scheduling: answer with the previous plan's result, not this one's, so this step
    # runs on the device while the scheduler processes the previous one.
    defer_result: bool = False


@dataclass
class StepResult:
    """Tokens sampled by step ``step_id`` (-1: no step), for its sequences that reached their end."""

    step_id: int
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None = None  # per sampled token: top (id, logprob)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports about itself (``describe``): the model facts and its cache capacity."""

    model_path: str
    model_name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_kv_blocks: int
    dtype: str
    attention_backend: str
    device: str
    rank: int = 0
    world_size: int = 1
