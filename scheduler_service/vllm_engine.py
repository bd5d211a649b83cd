"""The ``vllm.grpc.engine.VllmEngine`` servicer: vLLM's engine protocol, so SMG can front nanoserve.

SMG (the SGLang model gateway) serves the OpenAI HTTP API, tokenizes and applies chat templates
itself, and sends ``Generate`` with token ids. This servicer runs over the same EngineClient and
Tokenizer as ``GenerationServicer`` (servicer.py), with its error mapping and the one check,
``validate_request``; the stubs come from the pinned ``smg-grpc-proto`` package.

Done: HealthCheck, GetModelInfo (model_path and tokenizer_path are the model's LOCAL directory, so
the gateway reads the tokenizer from disk), GetServerInfo, Generate (streaming and not; penalties
and logit_bias; n > 1 as n requests whose later samples share the prompt's cached blocks,
parallel_streams.py), Abort (unknown ids are fine: the gateway aborts after a request may have
finished; a request with n > 1 aborts all its samples), GetLoads, GetTokenizer (a zip of the
model directory's tokenizer files, for a gateway that cannot read it), FlushCache and
SubscribeKvEvents (the BlockManager's stored and removed prefix blocks: vllm_cache.py).
Not done (UNIMPLEMENTED, the base class's default): Embed, StartProfile, StopProfile. Fields we
do not implement are INVALID_ARGUMENT naming the field, never ignored (``unsupported_field``,
vllm_wire.py); skip_special_tokens and spaces_between_special_tokens only
affect detokenization, which the gateway does: accepted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from protos.sampling_params import SamplingParams
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.constraint_checks import ConstraintChecker
from scheduler_service.engine_client import EngineClient
from scheduler_service.metrics import Metrics
from scheduler_service.parallel_streams import merge_streams
from scheduler_service.request_checks import validate_request
from scheduler_service.servicer import (
    Context,
    check_constraint,
    request_batches,
    request_limits,
    stream_errors,
    unary_errors,
)
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.tokenizer_bundle import chunks, tokenizer_zip
from scheduler_service.vllm_cache import flush_cache, kv_batch_to_pb
from scheduler_service.vllm_wire import (
    chunk_to_pb,
    complete_to_pb,
    parallel_samples,
    sampling_from_pb,
    unsupported_field,
)

SERVICE = "VllmEngine"
SERVICE_NAME = vpb.DESCRIPTOR.services_by_name[SERVICE].full_name
SAMPLING_FIELD = "sampling_params"
Responses = AsyncGenerator[vpb.GenerateResponse, None]


def _read_model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


class VllmEngineServicer(vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(
        self,
        engine_loop: EngineClient,
        tokenizer: Tokenizer,
        config: SchedulerServiceConfig,
        metrics: Metrics,
        constraints: ConstraintChecker | None = None,  # None: constrained requests refused
    ) -> None:
        self.metrics = metrics  # shared with GenerationServicer: both APIs' requests count
        self.constraints = constraints
        self.engine_loop = engine_loop
        self.tokenizer = tokenizer
        self.config = config
        self.model_dir = Path(config.model_dir).resolve()
        self.model_config = _read_model_config(self.model_dir)
        self.started_at = time.time()
        self.last_receive_at = 0.0
        self._samples_of: dict[str, list[str]] = {}  # a live request with n > 1: its samples' ids

    @unary_errors
    async def HealthCheck(
        self, request: vpb.HealthCheckRequest, context: Context
    ) -> vpb.HealthCheckResponse:
        if self.engine_loop.ready:
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
        """Aborting a request with n > 1 aborts all its samples."""
        samples_of = self._samples_of
        request_ids = [s for r in request.request_ids for s in samples_of.get(r, [r])]
        self.engine_loop.abort(request_ids)
        return vpb.AbortResponse()

    @stream_errors
    async def GetTokenizer(
        self, request: cpb.GetTokenizerRequest, context: Context
    ) -> AsyncIterator[cpb.GetTokenizerChunk]:
        """The model directory's tokenizer files as a zip, in chunks (tokenizer_bundle.py)."""
        data = await asyncio.to_thread(tokenizer_zip, self.model_dir)
        for piece, sha256 in chunks(data):
            yield cpb.GetTokenizerChunk(data=piece, sha256=sha256)

    @unary_errors
    async def FlushCache(
        self, request: cpb.FlushCacheRequest, context: Context
    ) -> cpb.FlushCacheResponse:
        success, message = await flush_cache(self.engine_loop, request.timeout_s)
        return cpb.FlushCacheResponse(success=success, message=message)

    @stream_errors
    async def SubscribeKvEvents(
        self, request: cpb.SubscribeKvEventsRequest, context: Context
    ) -> AsyncIterator[cpb.KvEventBatch]:
        """Live until the subscriber goes; events only while it is subscribed (kv_event_hub.py)."""
        block_size = self.engine_loop.info.block_size
        batches = self.engine_loop.kv_events.subscribe(request.start_sequence_number)
        async with aclosing(batches):
            async for batch in batches:
                yield kv_batch_to_pb(batch, block_size)

    @stream_errors
    async def Generate(
        self, request: vpb.GenerateRequest, context: Context
    ) -> AsyncIterator[vpb.GenerateResponse]:
        """Streaming: one chunk per batch of new tokens (``completion_tokens`` counts that batch,
        as vLLM's server does), then a Complete; not streaming: one Complete. A Complete always
        carries every output id and its sample's totals. With n > 1 every response carries its
        sample's ``index``: streamed chunks interleave and each sample's Complete comes when it
        finishes; not streamed, the n Completes come at the end, by index (as vLLM's server)."""
        self.last_receive_at = time.time()
        prompt_ids, params, n = self._checked(request)
        await check_constraint(self.constraints, params, SAMPLING_FIELD)
        request_id = request.request_id or uuid.uuid4().hex
        samples = parallel_samples(request_id, params, n)
        stream = request.stream

        def sample(index: int, scheduled: asyncio.Event | None) -> Responses:
            return self._sample(samples[index], index, prompt_ids, stream, scheduled)

        if n == 1:
            async with aclosing(sample(0, None)) as responses:
                async for response in responses:
                    yield response
            return
        self._samples_of[request_id] = [sample_id for sample_id, _ in samples]
        share_prompt = len(prompt_ids) >= self.engine_loop.info.block_size  # a full block
        merged = merge_streams(sample, n, share_prompt)
        try:
            async with aclosing(merged):
                if stream:
                    async for response in merged:
                        yield response
                else:
                    completes = [response async for response in merged]
                    for response in sorted(completes, key=lambda r: r.complete.index):
                        yield response
        finally:
            self._samples_of.pop(request_id, None)

    async def _sample(
        self, sample: tuple[str, SamplingParams], index: int, prompt_ids: list[int], stream: bool,
        scheduled: asyncio.Event | None,
    ) -> Responses:  # fmt: skip
        """One sample's responses; ``scheduled`` is set once its prompt has been computed."""
        sample_id, params = sample
        output_ids: list[int] = []
        logprobs: list[list[tuple[int, float]]] = []
        batches = request_batches(
            self.engine_loop, self.metrics, sample_id, prompt_ids, params, stream
        )
        async with aclosing(batches):
            async for batch in batches:
                if scheduled is not None:
                    scheduled.set()
                new_ids = [t for out in batch for t in out.new_token_ids]
                new_logprobs = [lp for out in batch for lp in out.new_logprobs or []]
                output_ids += new_ids
                logprobs += new_logprobs
                if stream and new_ids:
                    yield chunk_to_pb(new_ids, new_logprobs, len(prompt_ids), batch[-1], index)
                if batch[-1].finished:
                    break
            last = batch[-1]
            yield complete_to_pb(output_ids, logprobs, len(prompt_ids), last, params, index)

    def _checked(self, request: vpb.GenerateRequest) -> tuple[list[int], SamplingParams, int]:
        """The prompt's token ids, the sampling parameters and n, once checked (ValueError if
        not)."""
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
        n = request.sampling_params.n or 1
        max_n = self.config.max_num_seqs
        if n > max_n:
            raise ValueError(
                f"{SAMPLING_FIELD}.n={n} is invalid: must be <= {max_n} (--max-num-seqs)"
            )
        return prompt_ids, params, n

    def _prompt(self, request: vpb.GenerateRequest) -> tuple[list[int], str]:
        input_field = request.WhichOneof("input")
        if input_field == "tokenized":
            return list(request.tokenized.input_ids), "tokenized.input_ids"
        if input_field == "text":
            return self.tokenizer.encode(request.text), "text"
        raise ValueError("input is missing: set tokenized.input_ids or text")
