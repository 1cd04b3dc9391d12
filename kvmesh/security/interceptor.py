"""A grpc.aio server interceptor that authenticates every call.

With a policy configured, a call needs a principal (`kvmesh.security.identity`): a valid bearer
token or a verified client certificate. Without one it ends UNAUTHENTICATED before the servicer
runs; bad credentials (an unknown token) too. Exceptions: health checks answer anyone (probes
carry no credentials), and reflection answers only admins (PERMISSION_DENIED otherwise), so an
anonymous client cannot list the services. The servicer finds the caller with
`current_principal()`; what each principal may do is decided by the servicers (the policy's
`allows_*` functions), not here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kvmesh.security.identity import BadCredentials, Principal, authenticate, set_principal
from kvmesh.security.policy import PolicyFile, is_admin

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

Check = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Principal]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call against the policy's tokens and the peer's certificate."""

    def __init__(self, policy: PolicyFile) -> None:
        self.policy = policy
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            check = self._admin if method.startswith(ADMIN_PREFIXES) else self._authenticated
            wrapped = _wrap(handler, check)
            self._wrapped[method] = wrapped  # handlers are per method: wrap each once
        return wrapped

    async def _authenticated(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        policy = self.policy.current()
        try:
            principal = authenticate(context.auth_context(), context.invocation_metadata(), policy.tokens)
        except BadCredentials as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"bad credentials: {exc}")
            raise AssertionError("abort raises") from None
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this call needs credentials: a client certificate or a bearer token")
        assert principal is not None
        set_principal(principal)  # each call runs in its own task: the value ends with the call
        return principal

    async def _admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        principal = await self._authenticated(context)
        decision = is_admin(self.policy.current(), principal)
        if not decision:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        return principal


async def _passes(check: Check, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Runs `check` for a streaming response. A refusal has already set the status through
    `context.abort`, so the response generator just ends, with nothing yielded."""
    try:
        await check(context)
    except grpc.aio.AbortError:
        return False
    return True


def _wrap(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """The same handler with `check` run first, for each of the four call shapes."""
    if not handler.request_streaming and not handler.response_streaming:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await check(context)
            return await _maybe_await(inner_uu(request, context))

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if not handler.request_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if not await _passes(check, context):
                return
            async for item in _as_stream(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
    if not handler.response_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await check(context)
            return await _maybe_await(inner_su(requests, context))

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        if not await _passes(check, context):
            return
        async for item in _as_stream(inner_ss(requests, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer)


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _as_stream(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses, whether it is an async generator or writes with
    `context.write` and returns (then there is nothing to yield)."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    else:
        for item in result or ():
            yield item
