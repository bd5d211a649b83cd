"""Bearer-token authentication: the public server's interceptor and the worker link's metadata.

Clients of the public API send ``authorization: Bearer <token>``; the scheduler sends the worker
secret the same way on every call to a worker (worker_service/server.py checks it). Tokens are
compared in constant time and never logged: a refusal names the method, not what was presented.
Not here: where the secrets come from (config.py reads the environment) or TLS (__main__.py).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

log = logging.getLogger(__name__)
AUTHORIZATION = "authorization"
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The metadata that carries ``token``."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def presents(metadata: Iterable[tuple[str, Any]] | None, token: str) -> bool:
    """Whether ``metadata`` carries ``authorization: Bearer <token>`` (constant-time compare)."""
    expected = f"Bearer {token}".encode()
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            given = value.encode() if isinstance(value, str) else bytes(value)
            if hmac.compare_digest(given, expected):
                return True
    return False


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any call without the token, except health and reflection if open."""

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_SERVICE_PREFIXES) -> None:
        self._token = token
        self._open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        if presents(details.invocation_metadata, self._token):
            return handler
        log.warning("refused %s: missing or wrong bearer token", method)
        return refusal_like(handler, "missing or wrong bearer token (authorization metadata)", True)


def refusal_like(handler: grpc.RpcMethodHandler, message: str, aio: bool) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call UNAUTHENTICATED."""

    async def refuse_aio(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def refuse_sync(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    refuse = refuse_aio if aio else refuse_sync
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the worker secret) to every call on a sync channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _with_metadata(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            tuple(details.metadata or ()) + self._metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_metadata(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_metadata(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_metadata(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_metadata(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # type: ignore[no-untyped-def]
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
