"""A mesh client on a background thread, for hosts whose hooks are synchronous (vLLM's connector).

The host's thread never runs network code: it hands coroutines to the link's own event loop and
waits for them with a deadline (`call`; `acall` from a host's own event loop), or not at all
(`submit`, bounded: past
`max_pending` unfinished jobs new ones are dropped, so a slow mesh never builds an unbounded
backlog). Until the client is connected, and whenever a call fails or times out, the answer is
"nothing" (None): a cache must never fail or stall the inference it speeds up. The link keeps
reconnecting in the background with full-jitter backoff.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kvmesh.backoff import Backoff
from kvmesh.client.cache import CacheClient

log = logging.getLogger("kvmesh.integrations")

T = TypeVar("T")
Job = Callable[[CacheClient], Awaitable[T]]


class MeshLink:
    """Owns a thread, its event loop and the `CacheClient` built by `connect` on that loop."""

    def __init__(self, connect: Callable[[], Awaitable[CacheClient]], *, name: str = "kvmesh-link",
                 max_pending: int = 64, backoff: Backoff | None = None, logger: logging.Logger | None = None) -> None:
        self._connect = connect
        self._name = name
        self._max_pending = max_pending
        self._backoff = backoff or Backoff(base_s=0.2, cap_s=5.0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._client: CacheClient | None = None
        self._connected = threading.Event()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._connector: concurrent.futures.Future[None] | None = None
        self.dropped = 0
        self._log = logger or log

    def start(self) -> None:
        """Starts the thread and the first connection attempt (safe to call twice)."""
        if self._thread.is_alive() or self._closed:
            return
        self._thread.start()
        self._connector = asyncio.run_coroutine_threadsafe(self._keep_connecting(), self._loop)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _keep_connecting(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                self._client = await self._connect()
                self._connected.set()
                self._log.info("%s: connected to the mesh (%d cache nodes)", self._name, len(self._client.nodes))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the mesh is down: keep trying, never fail the host
                self._log.warning("%s: mesh not reachable (%s); retrying", self._name, exc)
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    @property
    def connected(self) -> bool:
        return self._client is not None

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def call(self, job: Job[T], timeout: float) -> T | None:
        """Runs `job(client)` on the link's loop and waits at most `timeout` seconds; None when
        not connected, on timeout (the job is cancelled) or on any error."""
        client = self._client
        if client is None or self._closed:
            return None
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(job, client), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._log.warning("%s: mesh call timed out after %.2f s", self._name, timeout)
        except Exception as exc:
            self._log.warning("%s: mesh call failed: %s", self._name, exc)
        return None

    async def acall(self, job: Job[T], timeout: float) -> T | None:
        """`call` for a host that has an event loop of its own: awaits instead of blocking it."""
        client = self._client
        if client is None or self._closed:
            return None
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(job, client), self._loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            future.cancel()
            self._log.warning("%s: mesh call timed out after %.2f s", self._name, timeout)
        except Exception as exc:
            self._log.warning("%s: mesh call failed: %s", self._name, exc)
        return None

    def submit(self, job: Job[object]) -> bool:
        """Starts `job(client)` without waiting; False (dropped) when not connected or when
        `max_pending` jobs are still running."""
        client = self._client
        if client is None or self._closed:
            return False
        with self._lock:
            if self._pending >= self._max_pending:
                self.dropped += 1
                return False
            self._pending += 1
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(job, client), self._loop)
        future.add_done_callback(self._finished)
        return True

    def _finished(self, future: concurrent.futures.Future[object]) -> None:
        with self._lock:
            self._pending -= 1
        if not future.cancelled() and future.exception() is not None:
            self._log.warning("%s: background mesh job failed: %s", self._name, future.exception())

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def close(self, timeout: float = 5.0) -> None:
        """Waits (bounded) for submitted jobs, closes the client, stops the loop and the thread."""
        if self._closed or not self._thread.is_alive():
            self._closed = True
            return
        self._closed = True

        async def shutdown() -> None:
            if self._connector is not None:
                self._connector.cancel()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=timeout)
            for task in others:
                task.cancel()
            if self._client is not None:
                await self._client.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout + 2.0)
        except Exception as exc:
            self._log.debug("%s: shutdown: %s", self._name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


async def _as_coroutine(job: Job[T], client: CacheClient) -> T:
    return await job(client)
