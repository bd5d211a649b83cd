"""Conversion between the public ``nanoserve.v1`` messages and the scheduler's domain objects.

Used only by the Generation servicer. Decoding checks only what it needs to decode (an input is
set, a chat renders), raising ValueError naming the field; what the request asks for is checked
after, once, by request_checks.validate_request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from protos.nanoserve.v1 import generation_pb2 as pb
from protos.sampling_params import SamplingParams
from protos.step_plan import WorkerInfo
from protos.wire_constraint import constraint_from_pb
from scheduler_service.engine import RequestOutput
from scheduler_service.engine_loop import ServerStats
from scheduler_service.stop_checker import FinishReason
from scheduler_service.tokenizer import Tokenizer

OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "detokenize",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "include_stop_str_in_output",
    "skip_special_tokens",
)
FINISH_REASONS = {
    FinishReason.STOP: pb.STOP,
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.ABORT: pb.ABORT,
}
Logprobs = list[list[tuple[int, float]]]


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields keep the engine defaults. Unchecked: validate_request checks the ranges."""
    values = {name: getattr(msg, name) for name in OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)}
    return SamplingParams(
        **values,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        logit_bias=dict(msg.logit_bias),
        constraint=constraint_from_pb(msg),
    )


class Prompt(NamedTuple):
    token_ids: list[int]
    field: str  # the request field it came from, as error messages name it: text, token_ids.ids


def prompt_from_pb(msg: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Tokenizer) -> Prompt:
    """The prompt's token ids from whichever ``input`` was set (unchecked: validate_request checks
    them); ValueError naming the field when there is none or the chat does not render."""
    input_field = msg.WhichOneof("input")
    if input_field == "text":
        return Prompt(tokenizer.encode(msg.text), "text")
    if input_field == "chat":
        messages = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ValueError(f"chat.messages: {e}") from None
        return Prompt(tokenizer.encode(text), "chat")
    if input_field == "token_ids":
        return Prompt(list(msg.token_ids.ids), "token_ids.ids")  # type: ignore[union-attr]
    raise ValueError("input is missing: set one of text, token_ids or chat")


def logprobs_to_pb(logprobs: Logprobs | None) -> list[pb.TokenLogprobs]:
    """Per token: the sampled (id, logprob) first, then the top ones."""
    if not logprobs:
        return []
    return [
        pb.TokenLogprobs(
            token_id=pairs[0][0],
            logprob=pairs[0][1],
            top_token_ids=[t for t, _ in pairs[1:]],
            top_logprobs=[v for _, v in pairs[1:]],
        )
        for pairs in logprobs
    ]


def chunk_to_pb(request_id: str, outputs: Sequence[RequestOutput]) -> pb.GenerateResponse:
    token_ids = [t for out in outputs for t in out.new_token_ids]
    logprobs = [lp for out in outputs for lp in (out.new_logprobs or [])]
    chunk = pb.Chunk(
        token_ids=token_ids,
        text="".join(out.new_text for out in outputs),
        logprobs=logprobs_to_pb(logprobs),
    )
    return pb.GenerateResponse(request_id=request_id, chunk=chunk)


def complete_to_pb(
    request_id: str,
    output_ids: list[int],
    text: str,
    logprobs: Logprobs,
    last: RequestOutput,
    usage: pb.Usage,
) -> pb.GenerateResponse:
    assert last.finish_reason is not None
    complete = pb.Complete(
        output_ids=output_ids,
        text=text,
        finish_reason=FINISH_REASONS[last.finish_reason],
        usage=usage,
        logprobs=logprobs_to_pb(logprobs),
    )
    return pb.GenerateResponse(request_id=request_id, complete=complete)


def model_info_to_pb(info: WorkerInfo, max_model_len: int) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model_path=info.model_path,
        model_name=info.model_name,
        max_model_len=max_model_len,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        block_size=info.block_size,
        dtype=info.dtype,
        attention_backend=info.attention_backend,
        tensor_parallel_size=info.world_size,
        device=info.device,
    )


def status_to_pb(stats: ServerStats, tokens_per_second: float) -> pb.GetServerStatusResponse:
    return pb.GetServerStatusResponse(
        ready=stats.ready,
        num_waiting_requests=stats.num_waiting,
        num_running_requests=stats.num_running,
        total_blocks=stats.total_blocks,
        free_blocks=stats.free_blocks,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        num_preemptions=stats.num_preemptions,
        generated_tokens_per_second=tokens_per_second,
        num_generated_tokens=stats.num_generated_tokens,
        num_prefix_cache_hit_tokens=stats.num_cache_hit_tokens,
        num_prefix_cache_query_tokens=stats.num_cache_query_tokens,
    )
