"""Reading gRPC streams in tests without cancelling them on a timeout."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Generic, TypeVar

import grpc

T = TypeVar("T")


class StreamReader(Generic[T]):
    """Drains a server stream into a queue from a task, so `next(timeout)` never breaks the call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[T | BaseException] = asyncio.Queue()
        self._task = asyncio.create_task(self._drain(), name="Task-stream-reader")

    async def _drain(self) -> None:
        try:
            async for item in self.call:
                self.queue.put_nowait(item)
            self.queue.put_nowait(EOFError("stream ended"))
        except grpc.aio.AioRpcError as exc:
            self.queue.put_nowait(exc)

    async def next(self, timeout: float = 10.0) -> T:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def nothing_within(self, seconds: float) -> bool:
        """True when no message arrives within `seconds`."""
        try:
            item = await asyncio.wait_for(self.queue.get(), seconds)
        except TimeoutError:
            return True
        self.queue.put_nowait(item)
        return False

    def drain_now(self) -> list[T]:
        out: list[T] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, BaseException):
                raise item
            out.append(item)
        return out

    async def close(self) -> None:
        self.call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
