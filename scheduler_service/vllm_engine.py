"""The ``vllm.grpc.engine.VllmEngine`` servicer: vLLM's engine protocol, so SMG can front nanoserve.

SMG (the SGLang model gateway) serves the OpenAI HTTP API, tokenizes and applies chat templates
itself, and sends ``Generate`` with token ids. This servicer runs over the same EngineLoop and
Tokenizer as ``GenerationServicer`` (servicer.py), with its error mapping and the one check,
``validate_request``; the stubs come from the pinned ``smg-grpc-proto`` package.

Done: HealthCheck, GetModelInfo (model_path and tokenizer_path are the model's LOCAL directory, so
the gateway reads the tokenizer from disk), GetServerInfo, Generate (streaming and not), Abort
(unknown ids are fine: the gateway aborts after a request may have finished), GetLoads.
Not yet done (UNIMPLEMENTED, the base class's default): FlushCache, Embed, StartProfile,
StopProfile, GetTokenizer, SubscribeKvEvents. Fields we do not implement are INVALID_ARGUMENT
naming the field, never ignored (``unsupported_field``); skip_special_tokens and
spaces_between_special_tokens only affect detokenization, which the gateway does: accepted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from protos.sampling_params import SamplingParams
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine import RequestOutput
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.metrics import Metrics
from scheduler_service.request_checks import validate_request
from scheduler_service.servicer import (
    Context,
    request_batches,
    request_limits,
    stream_errors,
    unary_errors,
)
from scheduler_service.stop_checker import FinishReason
from scheduler_service.tokenizer import Tokenizer

SERVICE = "VllmEngine"
SERVICE_NAME = vpb.DESCRIPTOR.services_by_name[SERVICE].full_name
SAMPLING_FIELD = "sampling_params"
DEFAULT_MAX_TOKENS = 16  # vLLM's, when the request leaves max_tokens unset


def unsupported_field(request: vpb.GenerateRequest) -> str | None:
    """The first field set to something we do not implement, as ``name=value``; None if none."""
    sp = request.sampling_params
    constraint = sp.WhichOneof("constraint")
    checks: tuple[tuple[bool, str, object], ...] = (
        (sp.frequency_penalty != 0, "sampling_params.frequency_penalty", sp.frequency_penalty),
        (sp.presence_penalty != 0, "sampling_params.presence_penalty", sp.presence_penalty),
        (sp.repetition_penalty not in (0, 1), "sampling_params.repetition_penalty",
         sp.repetition_penalty),
        (sp.n > 1, "sampling_params.n", sp.n),
        (sp.HasField("logprobs") and sp.logprobs < 0, "sampling_params.logprobs", sp.logprobs),
        (sp.HasField("prompt_logprobs"), "sampling_params.prompt_logprobs", sp.prompt_logprobs),
        (sp.include_stop_str_in_output, "sampling_params.include_stop_str_in_output", True),
        (bool(sp.logit_bias), "sampling_params.logit_bias", dict(sp.logit_bias)),
        (sp.HasField("truncate_prompt_tokens"), "sampling_params.truncate_prompt_tokens",
         sp.truncate_prompt_tokens),
        (constraint is not None, f"sampling_params.{constraint}", "(structured output)"),
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
    """proto3 zeros mean unset: top_p 0 is 1.0, top_k 0 is -1 (off), as vLLM reads them."""
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
    )


def logprobs_to_pb(logprobs: list[list[tuple[int, float]]]) -> vpb.OutputLogProbs:
    """Per token: the sampled (id, logprob) first, then the top ones."""
    return vpb.OutputLogProbs(
        token_logprobs=[pairs[0][1] for pairs in logprobs],
        token_ids=[pairs[0][0] for pairs in logprobs],
        top_logprobs=[
            vpb.TopLogProbs(values=[v for _, v in pairs[1:]], token_ids=[t for t, _ in pairs[1:]])
            for pairs in logprobs
        ],
    )


def _read_model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


class VllmEngineServicer(vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(
        self,
        engine_loop: EngineLoop,
        tokenizer: Tokenizer,
        config: SchedulerServiceConfig,
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics  # shared with GenerationServicer: both APIs' requests count
        self.engine_loop = engine_loop
        self.tokenizer = tokenizer
        self.config = config
        self.model_dir = Path(config.model_dir).resolve()
        self.model_config = _read_model_config(self.model_dir)
        self.started_at = time.time()
        self.last_receive_at = 0.0

    @unary_errors
    async def HealthCheck(
        self, request: vpb.HealthCheckRequest, context: Context
    ) -> vpb.HealthCheckResponse:
        if self.engine_loop.stats.ready:
            return vpb.HealthCheckResponse(healthy=True, message="ready")
        return vpb.HealthCheckResponse(healthy=False, message="no worker session is up")

    @unary_errors
    async def GetModelInfo(
        self, request: vpb.GetModelInfoRequest, context: Context
    ) -> vpb.GetModelInfoResponse:
        info, config = self.engine_loop.info, self.model_config
        max_model_len = self.engine_loop.max_model_len
        return vpb.GetModelInfoResponse(
            model_path=str(self.model_dir),
            tokenizer_path=str(self.model_dir),
            is_generation=True,
            max_context_length=max_model_len,
            vocab_size=info.vocab_size,
            served_model_name=info.model_name,
            model_type=config.get("model_type", ""),
            architectures=config.get("architectures", []),
            eos_token_ids=list(info.eos_token_ids),
            pad_token_id=config.get("pad_token_id") or 0,
            bos_token_id=config.get("bos_token_id") or 0,
            max_req_input_len=max_model_len - 1,
        )

    @unary_errors
    async def GetServerInfo(
        self, request: vpb.GetServerInfoRequest, context: Context
    ) -> vpb.GetServerInfoResponse:
        info = self.engine_loop.info
        return vpb.GetServerInfoResponse(
            active_requests=self.engine_loop.num_streams,
            last_receive_timestamp=self.last_receive_at,
            uptime_seconds=time.time() - self.started_at,
            server_type="nanoserve",
            data_parallel_size=1,
            block_size=info.block_size,
            attention_backend=info.attention_backend,
            model_dtype=info.dtype,
            max_num_seqs=self.config.max_num_seqs,
        )

    @unary_errors
    async def GetLoads(
        self, request: vpb.GetLoadsRequest, context: Context
    ) -> vpb.GetLoadsResponse:
        stats = self.engine_loop.stats
        block_size = self.engine_loop.info.block_size
        used_blocks = stats.total_blocks - stats.free_blocks
        load = vpb.SchedulerLoad(
            num_running_reqs=stats.num_running,
            num_waiting_reqs=stats.num_waiting,
            num_total_reqs=stats.num_running + stats.num_waiting,
            num_used_tokens=used_blocks * block_size,
            max_total_num_tokens=stats.total_blocks * block_size,
            token_usage=used_blocks / max(1, stats.total_blocks),
            gen_throughput=self.engine_loop.generated_tokens_per_second(),
            cache_hit_rate=stats.prefix_cache_hit_rate,
            max_running_requests=self.config.max_num_seqs,
        )
        return vpb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version="nanoserve",
            dp_rank_count=1,
            loads=[load],
        )

    @unary_errors
    async def Abort(self, request: vpb.AbortRequest, context: Context) -> vpb.AbortResponse:
        self.engine_loop.abort(list(request.request_ids))
        return vpb.AbortResponse()

    @stream_errors
    async def Generate(
        self, request: vpb.GenerateRequest, context: Context
    ) -> AsyncIterator[vpb.GenerateResponse]:
        """Streaming: one chunk per batch of new tokens (``completion_tokens`` counts that batch,
        as vLLM's server does), then a Complete; not streaming: one Complete. A Complete always
        carries every output id and the request's totals."""
        self.last_receive_at = time.time()
        prompt_ids, params = self._checked(request)
        request_id = request.request_id or uuid.uuid4().hex
        output_ids: list[int] = []
        logprobs: list[list[tuple[int, float]]] = []
        batches = request_batches(
            self.engine_loop, self.metrics, request_id, prompt_ids, params, request.stream
        )
        async with aclosing(batches):
            async for batch in batches:
                new_ids = [t for out in batch for t in out.new_token_ids]
                new_logprobs = [lp for out in batch for lp in out.new_logprobs or []]
                output_ids += new_ids
                logprobs += new_logprobs
                if request.stream and new_ids:
                    yield self._chunk(new_ids, new_logprobs, len(prompt_ids), batch[-1])
                if batch[-1].finished:
                    break
            yield self._complete(output_ids, logprobs, len(prompt_ids), batch[-1], params)

    def _checked(self, request: vpb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the sampling parameters, once checked (ValueError if not)."""
        unsupported = unsupported_field(request)
        if unsupported is not None:
            raise ValueError(f"{unsupported} is not supported by this server")
        params = sampling_from_pb(request.sampling_params)
        prompt_ids, prompt_field = self._prompt(request)
        limits = request_limits(self.engine_loop, self.config)
        validate_request(
            prompt_ids,
            params,
            limits,
            request_id=request.request_id,
            prompt_field=prompt_field,
            sampling_field=SAMPLING_FIELD,
        )
        return prompt_ids, params

    def _prompt(self, request: vpb.GenerateRequest) -> tuple[list[int], str]:
        input_field = request.WhichOneof("input")
        if input_field == "tokenized":
            return list(request.tokenized.input_ids), "tokenized.input_ids"
        if input_field == "text":
            return self.tokenizer.encode(request.text), "text"
        raise ValueError("input is missing: set tokenized.input_ids or text")

    @staticmethod
    def _chunk(
        new_ids: list[int], logprobs: list[list[tuple[int, float]]], num_prompt_tokens: int,
        last: RequestOutput,
    ) -> vpb.GenerateResponse:  # fmt: skip
        chunk = vpb.GenerateStreamChunk(
            token_ids=new_ids,
            prompt_tokens=num_prompt_tokens,
            completion_tokens=len(new_ids),
            cached_tokens=last.num_cached_tokens,
        )
        if logprobs:
            chunk.output_logprobs.CopyFrom(logprobs_to_pb(logprobs))
        return vpb.GenerateResponse(chunk=chunk)

    @staticmethod
    def _complete(
        output_ids: list[int], logprobs: list[list[tuple[int, float]]], num_prompt_tokens: int,
        last: RequestOutput, params: SamplingParams,
    ) -> vpb.GenerateResponse:  # fmt: skip
        assert last.finish_reason is not None
        complete = vpb.GenerateComplete(
            output_ids=output_ids,
            finish_reason=last.finish_reason.value,  # stop, length, abort: vLLM's names
            prompt_tokens=num_prompt_tokens,
            completion_tokens=len(output_ids),
            cached_tokens=last.num_cached_tokens,
        )
        stopped_on = output_ids[-1] if output_ids else None
        if last.finish_reason == FinishReason.STOP and stopped_on in params.stop_token_ids:
            complete.matched_token_id = stopped_on  # EOS, as in vLLM, is no matched stop
        if logprobs:
            complete.output_logprobs.CopyFrom(logprobs_to_pb(logprobs))
        return vpb.GenerateResponse(complete=complete)
