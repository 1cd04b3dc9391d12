"""Undecodable request bodies become INVALID_ARGUMENT, with one rate-limited log line.

grpc.aio answers a request its deserializer cannot parse with UNKNOWN and logs a traceback
per call, so a client sending garbage floods the log. `DecodeGuard`, a server interceptor
every kvmesh server installs, wraps each method's deserializer so a parse failure yields a
marker instead of raising, and wraps the method so the marker is answered INVALID_ARGUMENT
before the handler sees it (unary requests) or where the handler reads it (request streams:
`UndecodableRequest`, an InvalidArgument, is raised from the request iterator, and the
status is set even when the handler lets it escape). Logging: at most one line per
`log_interval_s`, counting what was not logged.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kvmesh.runtime.errors import InvalidArgument

log = logging.getLogger("kvmesh.decoding")

MAX_DETAIL = 200  # characters of the parser's message in the status


class Undecodable:
    """What a wrapped deserializer returns for bytes it cannot parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class UndecodableRequest(InvalidArgument):
    """Raised from a request stream at a message that could not be parsed."""


class RateLimitedLog:
    """One warning per interval at most; the next one says how many were left out."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next = 0.0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> bool:
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval_s
        suppressed, self.suppressed = self.suppressed, 0
        log.warning(message + " (%d more since the last such line)", *args, suppressed)
        return True


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, or any parser's own error
            return Undecodable(f"{type(exc).__name__}: {exc}"[:MAX_DETAIL])

    return parse


class DecodeGuard(grpc.aio.ServerInterceptor):
    """The interceptor: see the module docstring."""

    def __init__(self, log_interval_s: float = 10.0) -> None:
        self.log = RateLimitedLog(log_interval_s)
        self.rejected = 0
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # per method, once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or getattr(handler, "request_deserializer", None) is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped: dict[str, Any] = {"request_deserializer": _safe(handler.request_deserializer)}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                wrapped[kind] = self._wrap(method, kind, behaviour)
        result = handler._replace(**wrapped)
        if len(self._wrapped) < 1024:  # methods are few; unknown names never get here with a handler
            self._wrapped[method] = (handler, result)
        return result

    def _reject(self, method: str, error: str) -> str:
        self.rejected += 1
        self.log.warning("undecodable request to %s answered INVALID_ARGUMENT: %s", method, error)
        return f"undecodable request message: {error}"

    def _wrap(self, method: str, kind: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        guard = self
        streams_in = kind.startswith("stream")

        def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async def gen() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, Undecodable):
                        raise UndecodableRequest(guard._reject(method, request.error))
                    yield request

            return gen()

        if inspect.isasyncgenfunction(behaviour):

            async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, guard._reject(method, request.error))
                message = ""
                try:
                    async for response in behaviour(checked(request) if streams_in else request, context):
                        yield response
                    return
                except UndecodableRequest as exc:
                    message = str(exc)
                except grpc.aio.AbortError:
                    del request  # the abort's traceback keeps this frame: not the request with it
                    raise
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

            return generator

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, guard._reject(method, request.error))
            message = ""
            try:
                return await behaviour(checked(request) if streams_in else request, context)
            except UndecodableRequest as exc:
                message = str(exc)
            except grpc.aio.AbortError:
                del request  # the abort's traceback keeps this frame: not the request with it
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        return call
