"""Conversion between ``vllm.grpc.engine`` messages and the scheduler's domain objects.

Used only by the VllmEngine servicer (vllm_engine.py): what a Generate request asks for
(``unsupported_field`` names what we do not implement; ``sampling_from_pb``; ``parallel_samples``
for n > 1) and the responses (chunks and completes, each carrying its sample's ``index``). Ranges
are checked after, once, by request_checks.validate_request.
"""

from __future__ import annotations

from dataclasses import replace

from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from protos.sampling_params import SamplingParams
from protos.wire_constraint import constraint_from_pb
from scheduler_service.engine import RequestOutput
from scheduler_service.request_checks import MAX_SEED
from scheduler_service.stop_checker import FinishReason

DEFAULT_MAX_TOKENS = 16  # vLLM's, when the request leaves max_tokens unset
Logprobs = list[list[tuple[int, float]]]


def unsupported_field(request: vpb.GenerateRequest) -> str | None:
    """The first field set to something we do not implement, as ``name=value``; None if none."""
    sp = request.sampling_params
    constraint = sp.WhichOneof("constraint")
    checks: tuple[tuple[bool, str, object], ...] = (
        (sp.HasField("logprobs") and sp.logprobs < 0, "sampling_params.logprobs", sp.logprobs),
        (sp.HasField("prompt_logprobs"), "sampling_params.prompt_logprobs", sp.prompt_logprobs),
        (sp.HasField("truncate_prompt_tokens"), "sampling_params.truncate_prompt_tokens",
         sp.truncate_prompt_tokens),
        (constraint == "structural_tag", "sampling_params.structural_tag", "(structured output)"),
        (request.HasField("mm_inputs"), "mm_inputs", "(multimodal)"),
        (len(request.extra_mm_inputs) > 0, "extra_mm_inputs", "(multimodal)"),
        (request.HasField("media_refs"), "media_refs", "(multimodal)"),
        (request.HasField("kv_transfer_params"), "kv_transfer_params", "(KV transfer)"),
        (request.HasField("kv_transfer_params_json"), "kv_transfer_params_json",
         request.kv_transfer_params_json),
        (request.HasField("data_parallel_rank") and request.data_parallel_rank != 0,
         "data_parallel_rank", request.data_parallel_rank),
    )  # fmt: skip
    return next((f"{name}={value!r}" for is_set, name, value in checks if is_set), None)


def sampling_from_pb(msg: vpb.SamplingParams) -> SamplingParams:
    """proto3 zeros mean unset: top_p 0 is 1.0, top_k 0 is -1 (off), repetition_penalty 0 is 1.0
    (off), as vLLM reads them."""
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k or -1,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        min_tokens=msg.min_tokens,
        ignore_eos=msg.ignore_eos,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        logprobs=msg.logprobs if msg.HasField("logprobs") else 0,
        detokenize=bool(msg.stop),  # the gateway detokenizes; we need text only to match stops
        include_stop_str_in_output=msg.include_stop_str_in_output,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty or 1.0,
        logit_bias=dict(msg.logit_bias),
        constraint=constraint_from_pb(msg),  # json_schema, regex, grammar, json_object, choice
    )


def logprobs_to_pb(logprobs: Logprobs) -> vpb.OutputLogProbs:
    """Per token: the sampled (id, logprob) first, then the top ones."""
    return vpb.OutputLogProbs(
        token_logprobs=[pairs[0][1] for pairs in logprobs],
        token_ids=[pairs[0][0] for pairs in logprobs],
        top_logprobs=[
            vpb.TopLogProbs(values=[v for _, v in pairs[1:]], token_ids=[t for t, _ in pairs[1:]])
            for pairs in logprobs
        ],
    )


def parallel_samples(
    request_id: str, params: SamplingParams, n: int
) -> list[tuple[str, SamplingParams]]:
    """The requests of n parallel samples of one prompt: (request id, params) each. One sample
    keeps the request's id; n > 1 derive ``{index}_{request_id}`` and, for a seeded request,
    seed + index (vLLM's child requests), so the samples differ and each one is reproducible;
    wrapped into the seed range, which the request's own seed was checked against."""
    if n == 1:
        return [(request_id, params)]
    return [
        (
            f"{index}_{request_id}",
            params
            if params.seed is None
            else replace(params, seed=(params.seed + index) % MAX_SEED),
        )
        for index in range(n)
    ]


def chunk_to_pb(
    new_ids: list[int], logprobs: Logprobs, num_prompt_tokens: int, last: RequestOutput,
    index: int,
) -> vpb.GenerateResponse:  # fmt: skip
    chunk = vpb.GenerateStreamChunk(
        token_ids=new_ids,
        prompt_tokens=num_prompt_tokens,
        completion_tokens=len(new_ids),
        cached_tokens=last.num_cached_tokens,
        index=index,
    )
    if logprobs:
        chunk.output_logprobs.CopyFrom(logprobs_to_pb(logprobs))
    return vpb.GenerateResponse(chunk=chunk)


def complete_to_pb(
    output_ids: list[int], logprobs: Logprobs, num_prompt_tokens: int, last: RequestOutput,
    params: SamplingParams, index: int,
) -> vpb.GenerateResponse:  # fmt: skip
    assert last.finish_reason is not None
    complete = vpb.GenerateComplete(
        output_ids=output_ids,
        finish_reason=last.finish_reason.value,  # stop, length, abort: vLLM's names
        prompt_tokens=num_prompt_tokens,
        completion_tokens=len(output_ids),
        cached_tokens=last.num_cached_tokens,
        index=index,
    )
    stopped_on = output_ids[-1] if output_ids else None
    if last.finish_reason == FinishReason.STOP and stopped_on in params.stop_token_ids:
        complete.matched_token_id = stopped_on  # EOS, as in vLLM, is no matched stop
    if logprobs:
        complete.output_logprobs.CopyFrom(logprobs_to_pb(logprobs))
    return vpb.GenerateResponse(complete=complete)
