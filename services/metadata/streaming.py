"""Error mapping for streaming handlers (unary handlers use `kvmesh.runtime.errors.guard`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import NoReturn, TypeVar

import grpc

from kvmesh.runtime.errors import KvmeshError, Unavailable, status_for

T = TypeVar("T")

log = logging.getLogger("kvmesh.metadata")


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Ends the stream with the status `exc` maps to (INTERNAL, logged, for a bug)."""
    if not isinstance(exc, KvmeshError | ValueError):
        log.error("stream handler failed", exc_info=exc)
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


async def until_closing(source: AsyncGenerator[T, None], closing: asyncio.Event) -> AsyncIterator[T]:
    """Items of `source` until `closing` is set, then Unavailable (the client resumes elsewhere).

    A draining replica ends its watch streams at once instead of holding them for the whole
    grace period, so watchers move to another replica without waiting.
    """
    stop = asyncio.ensure_future(closing.wait())
    item: asyncio.Future[T] | None = None
    try:
        while True:
            item = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
            if item not in done:
                raise Unavailable("metadata replica shutting down; resume the watch on another replica")
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            yield value
    finally:
        stop.cancel()
        if item is not None and not item.done():
            item.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await item
        await source.aclose()
