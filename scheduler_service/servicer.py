"""The public ``nanoserve.v1.Generation`` servicer (grpc.aio): decode, call the engine loop, encode.

Errors are raised as domain exceptions and turned into statuses in one place (``STATUS_OF``): a
ValueError is INVALID_ARGUMENT, with its message (which names the field) as the details. Each
Generate request is checked once, here, by ``validate_request``; so is a request whose bytes do not
decode (``add_to_server`` registers the methods with a deserializer that never raises).
A Generate stream that ends for any reason other than finishing (cancel, deadline, error) has its
request aborted, so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message_factory import GetMessageClass

from protos.nanoserve.v1 import generation_pb2 as pb
from protos.nanoserve.v1 import generation_pb2_grpc
from protos.sampling_params import SamplingParams
from scheduler_service import wire_public
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.constraint_checks import ConstraintChecker
from scheduler_service.engine import RequestOutput
from scheduler_service.engine_client import EngineClient
from scheduler_service.metrics import Metrics
from scheduler_service.request_checks import RequestLimits, validate_request
from scheduler_service.request_decoding import Undecodable, lenient_deserializer
from scheduler_service.request_streams import Overloaded, Unavailable
from scheduler_service.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (LookupError, grpc.StatusCode.NOT_FOUND),
)
Request = TypeVar("Request")
Response = TypeVar("Response")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


async def abort_with_status(context: Context, error: Exception) -> NoReturn:
    """End the call with the status that ``error`` maps to (INTERNAL for anything unexpected)."""
    for kind, code in STATUS_OF:
        if isinstance(error, kind):
            await context.abort(code, str(error))
    log.exception("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")
    raise AssertionError("unreachable")


def decoded(request: Request | Undecodable) -> Request:
    """The request, or a ValueError saying why its bytes did not decode (INVALID_ARGUMENT)."""
    if isinstance(request, Undecodable):
        raise ValueError(request.reason)
    return request


def unary_errors(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request | Undecodable, Context], Awaitable[Response]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Request | Undecodable, context: Context) -> Response:
        try:
            return await method(self, decoded(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with_status(context, e)

    return wrapper


def stream_errors(
    method: Callable[[Any, Request, Context], AsyncIterator[Response]],
) -> Callable[[Any, Request | Undecodable, Context], AsyncIterator[Response]]:
    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Request | Undecodable, context: Context
    ) -> AsyncIterator[Response]:
        try:
            async for response in method(self, decoded(request), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with_status(context, e)

    return wrapper


class _OutputBatches:
    """Reads a request's queue in batches: everything already there, up to an error."""

    def __init__(self, queue: asyncio.Queue[RequestOutput | Exception]) -> None:
        self.queue = queue
        self.pending_error: Exception | None = None

    async def next_batch(self) -> list[RequestOutput]:
        if self.pending_error is not None:
            raise self.pending_error
        item = await self.queue.get()
        batch: list[RequestOutput] = []
        while True:
            if isinstance(item, Exception):
                if not batch:
                    raise item
                self.pending_error = item
                return batch
            batch.append(item)
            if item.finished or self.queue.empty():
                return batch
            item = self.queue.get_nowait()


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        engine_loop: EngineClient,
        tokenizer: Tokenizer,
        config: SchedulerServiceConfig,
        metrics: Metrics | None = None,
        constraints: ConstraintChecker | None = None,  # None: constrained requests refused
    ) -> None:
        self.metrics = metrics or Metrics()
        self.constraints = constraints
        self.engine_loop = engine_loop
        self.tokenizer = tokenizer
        self.config = config

    @stream_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        params = wire_public.sampling_from_pb(request.sampling)
        prompt_ids, prompt_field = wire_public.prompt_from_pb(request, self.tokenizer)
        validate_request(
            prompt_ids,
            params,
            request_limits(self.engine_loop, self.config),
            request_id=request.request_id,
            prompt_field=prompt_field,
        )
        await check_constraint(self.constraints, params, "sampling")
        request_id = request.request_id or uuid.uuid4().hex
        output_ids: list[int] = []
        text_parts: list[str] = []
        logprobs: list[list[tuple[int, float]]] = []
        batches = request_batches(
            self.engine_loop, self.metrics, request_id, prompt_ids, params, request.stream
        )
        async with aclosing(batches):
            async for batch in batches:
                for out in batch:
                    output_ids += out.new_token_ids
                    text_parts.append(out.new_text)
                    logprobs += out.new_logprobs or []
                if request.stream and any(out.new_token_ids or out.new_text for out in batch):
                    yield wire_public.chunk_to_pb(request_id, batch)
                if batch[-1].finished:
                    break
            usage = pb.Usage(
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(output_ids),
                cached_tokens=max(out.num_cached_tokens for out in batch),
            )
            yield wire_public.complete_to_pb(
                request_id, output_ids, "".join(text_parts), logprobs, batch[-1], usage
            )

    @unary_errors
    async def Abort(self, request: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        request_ids = list(request.request_ids)
        if not request_ids:
            raise ValueError("request_ids is empty: name at least one request")
        aborted = self.engine_loop.abort(request_ids)
        unknown = [r for r in request_ids if r not in aborted]
        if unknown:
            done = f"; aborted {aborted}" if aborted else ""
            raise LookupError(f"request_ids: no live request has id {unknown}{done}")
        return pb.AbortResponse(aborted_ids=aborted)

    @unary_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        ids = wire_public.prompt_from_pb(request, self.tokenizer).token_ids
        return pb.TokenizeResponse(token_ids=ids)

    @unary_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        return wire_public.model_info_to_pb(self.engine_loop.info, self.engine_loop.max_model_len)

    @unary_errors
    async def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: Context
    ) -> pb.GetServerStatusResponse:
        loop = self.engine_loop
        return wire_public.status_to_pb(loop.stats, loop.generated_tokens_per_second())


async def request_batches(
    engine_loop: EngineClient,
    metrics: Metrics,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    stream: bool,
) -> AsyncGenerator[list[RequestOutput], None]:
    """Submit a checked request and yield its output batches, the last one finishing it. The
    request is counted in ``metrics`` and closed in the engine loop however it ends (finished,
    cancelled, failed: then aborted, its blocks freed), once the generator is closed: iterate it
    under ``contextlib.aclosing``. Both servicers' Generate run on it."""
    timer = metrics.track_request()
    outputs = _OutputBatches(engine_loop.submit(request_id, prompt_ids, params, stream=stream))
    finished = False
    try:
        while not finished:
            batch = await outputs.next_batch()
            finished = batch[-1].finished
            timer.on_tokens(sum(len(out.new_token_ids) for out in batch))
            if finished:
                timer.on_finish(batch[-1].finish_reason)
            yield batch
    finally:
        timer.on_finish(None)  # no-op after a finish: counts cancels and errors
        engine_loop.close(request_id, finished)


async def check_constraint(
    checker: ConstraintChecker | None, params: SamplingParams, field: str
) -> None:
    """Compile a constrained request's constraint on a worker (ValueError if it does not)."""
    if params.constraint is not None and checker is None:
        raise ValueError(f"{field}.{params.constraint.kind} is not supported by this server")
    if checker is not None:
        await checker.check(params, field)


def request_limits(engine_loop: EngineClient, config: SchedulerServiceConfig) -> RequestLimits:
    """This session's model limits (a reconnect may bring another model) and the flags."""
    return RequestLimits(
        vocab_size=engine_loop.info.vocab_size,
        max_model_len=engine_loop.max_model_len,
        max_prompt_tokens=config.max_prompt_tokens,
        max_output_tokens=config.max_output_tokens,
        max_num_stop=config.max_num_stop,
        max_stop_chars=config.max_stop_chars,
        max_request_id_chars=config.max_request_id_chars,
    )


def add_to_server(
    servicer: object,
    server: grpc.aio.Server,
    file_descriptor: FileDescriptor = pb.DESCRIPTOR,
    service_name: str = "Generation",
) -> None:
    """Register ``servicer`` for the service ``service_name`` of ``file_descriptor`` as the
    generated ``add_*Servicer_to_server`` would, with one difference: each request's bytes go
    through ``lenient_deserializer``, so one that does not decode is answered INVALID_ARGUMENT
    (by ``decoded``), not UNKNOWN by grpc."""
    service = file_descriptor.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        assert not method.client_streaming, method.full_name
        make_handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make_handler(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
