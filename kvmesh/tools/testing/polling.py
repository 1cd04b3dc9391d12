"""The one way tests wait for a condition: poll it, with a deadline and a clear failure.

`eventually(check)` calls `check` (sync or async) until it returns something truthy and returns
that value. An exception of a type named in `retry_on` (AssertionError by default) counts as
"not yet"; any other exception propagates at once. At the deadline it raises `TimeoutError`
saying what it waited for and what the last attempt saw, so a failing test explains itself.
`eventually_sync` is the same for code without an event loop (deploy checks, CLI tests).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

Retry = type[BaseException] | tuple[type[BaseException], ...]


def _describe(what: str, timeout: float, last: object, error: BaseException | None) -> str:
    seen = f"last error: {error!r}" if error is not None else f"last result: {last!r}"
    return f"timed out after {timeout:g}s waiting for {what} ({seen})"


@overload
async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = ..., interval: float = ..., what: str = ...,
    retry_on: Retry = ...,
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T], *, timeout: float = ..., interval: float = ..., what: str = ..., retry_on: Retry = ...,
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "the condition",
    retry_on: Retry = AssertionError,
) -> Any:
    """Polls `check` until it returns a truthy value (returned) or `timeout` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last, error = result, None
        except retry_on as exc:
            error = exc
        if loop.time() >= deadline:
            raise TimeoutError(_describe(what, timeout, last, error)) from error
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "the condition",
    retry_on: Retry = AssertionError,
) -> T:
    """`eventually` for callers without an event loop: blocks the calling thread between tries."""
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
            last, error = result, None
        except retry_on as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(_describe(what, timeout, last, error)) from error
        time.sleep(interval)
