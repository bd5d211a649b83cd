"""Conversion between the step protocol's domain objects and ``nanoserve.worker.v1`` messages.

Both ends of the internal link use this module: the scheduler's WorkerClient encodes plans and
decodes results, the worker's servicer does the opposite. It is the only place that knows how a
``StepPlan`` is laid out on the wire. Arrays go into packed repeated fields in one ``extend`` each
(upb copies a Python list of ints in C), and lists of lists are flattened into counts plus one flat
array. Torch-free: the scheduler imports it.
"""

from __future__ import annotations

from itertools import accumulate

from protos.nanoserve.worker.v1 import worker_pb2 as pb
from protos.sampling_params import SamplingParams
from protos.step_plan import (
    NewSequence,
    ResumedSequence,
    StepPlan,
    StepResult,
    WorkerInfo,
)
from protos.wire_constraint import constraint_from_pb, constraint_to_pb


def info_to_pb(info: WorkerInfo) -> pb.DescribeResponse:
    return pb.DescribeResponse(
        model_path=info.model_path,
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        eos_token_ids=info.eos_token_ids,
        block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks,
        dtype=info.dtype,
        attention_backend=info.attention_backend,
        device=info.device,
        rank=info.rank,
        world_size=info.world_size,
    )


def info_from_pb(msg: pb.DescribeResponse) -> WorkerInfo:
    return WorkerInfo(
        model_path=msg.model_path,
        model_name=msg.model_name,
        vocab_size=msg.vocab_size,
        max_model_len=msg.max_model_len,
        eos_token_ids=tuple(msg.eos_token_ids),
        block_size=msg.block_size,
        num_kv_blocks=msg.num_kv_blocks,
        dtype=msg.dtype,
        attention_backend=msg.attention_backend,
        device=msg.device,
        rank=msg.rank,
        world_size=msg.world_size,
    )


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        has_seed=params.seed is not None,
        seed=params.seed or 0,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        stop_token_ids=params.stop_token_ids,
        logprobs=params.logprobs,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias_token_ids=list(params.logit_bias),
        logit_bias_values=list(params.logit_bias.values()),
    )
    constraint_to_pb(params.constraint, msg)
    return msg


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Stop strings stay with the scheduler: the worker only needs what shapes sampling."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.has_seed else None,
        max_tokens=msg.max_tokens,
        min_tokens=msg.min_tokens,
        ignore_eos=msg.ignore_eos,
        stop_token_ids=tuple(msg.stop_token_ids),
        logprobs=msg.logprobs,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty,
        logit_bias=dict(zip(msg.logit_bias_token_ids, msg.logit_bias_values)),
        constraint=constraint_from_pb(msg),
    )


def plan_to_pb(plan: StepPlan, session_id: int) -> pb.StepRequest:
    msg = pb.StepRequest(
        session_id=session_id, step_id=plan.step_id, defer_result=plan.defer_result
    )
    for new in plan.new_seqs:
        msg.new_seqs.append(
            pb.NewSequence(
                seq_id=new.seq_id,
                prompt_token_ids=new.prompt_token_ids,
                params=params_to_pb(new.params),
                block_ids=new.block_ids,
                num_computed_tokens=new.num_computed_tokens,
            )
        )
    if plan.resumed_seqs:
        resumed = plan.resumed_seqs
        msg.resumed_seq_ids.extend([r.seq_id for r in resumed])
        msg.resumed_num_computed_tokens.extend([r.num_computed_tokens for r in resumed])
        msg.resumed_num_blocks.extend([len(r.block_ids) for r in resumed])
        msg.resumed_block_ids.extend([b for r in resumed for b in r.block_ids])
    if plan.appended_seq_ids:
        msg.appended_seq_ids.extend(plan.appended_seq_ids)
        msg.appended_num_blocks.extend([len(ids) for ids in plan.appended_block_ids])
        msg.appended_block_ids.extend([b for ids in plan.appended_block_ids for b in ids])
    msg.preempted_seq_ids.extend(plan.preempted_seq_ids)
    msg.finished_seq_ids.extend(plan.finished_seq_ids)
    msg.seq_ids.extend(plan.seq_ids)
    msg.num_new_tokens.extend(plan.num_new_tokens)
    return msg


def plan_from_pb(msg: pb.StepRequest) -> StepPlan:
    resumed_tables = _split(msg.resumed_block_ids[:], msg.resumed_num_blocks)
    return StepPlan(
        step_id=msg.step_id,
        new_seqs=[
            NewSequence(
                seq_id=new.seq_id,
                prompt_token_ids=new.prompt_token_ids[:],
                params=params_from_pb(new.params),
                block_ids=new.block_ids[:],
                num_computed_tokens=new.num_computed_tokens,
            )
            for new in msg.new_seqs
        ],
        resumed_seqs=[
            ResumedSequence(seq_id, table, num_computed)
            for seq_id, table, num_computed in zip(
                msg.resumed_seq_ids, resumed_tables, msg.resumed_num_computed_tokens
            )
        ],
        appended_seq_ids=msg.appended_seq_ids[:],
        appended_block_ids=_split(msg.appended_block_ids[:], msg.appended_num_blocks),
        preempted_seq_ids=msg.preempted_seq_ids[:],
        finished_seq_ids=msg.finished_seq_ids[:],
        seq_ids=msg.seq_ids[:],
        num_new_tokens=msg.num_new_tokens[:],
        defer_result=msg.defer_result,
    )


def result_to_pb(result: StepResult, compute_ns: int = 0) -> pb.StepResponse:
    msg = pb.StepResponse(step_id=result.step_id, compute_ns=compute_ns)
    msg.seq_ids.extend(result.seq_ids)
    msg.token_ids.extend(result.token_ids)
    if result.logprobs is not None:
        msg.num_logprobs.extend([len(pairs) for pairs in result.logprobs])
        msg.logprob_token_ids.extend([t for pairs in result.logprobs for t, _ in pairs])
        msg.logprob_values.extend([v for pairs in result.logprobs for _, v in pairs])
    return msg


def result_from_pb(msg: pb.StepResponse) -> StepResult:
    logprobs = None
    if msg.num_logprobs:
        pairs = list(zip(msg.logprob_token_ids, msg.logprob_values))
        logprobs = _split(pairs, msg.num_logprobs)
    return StepResult(msg.step_id, msg.seq_ids[:], msg.token_ids[:], logprobs)


def _split(flat: list, counts: object) -> list[list]:
    """``flat`` cut into consecutive pieces of the given lengths."""
    ends = list(accumulate(counts))  # type: ignore[call-overload]
    return [flat[end - n : end] for end, n in zip(ends, counts)]  # type: ignore[call-overload]
