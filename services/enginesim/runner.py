"""Runs a `BatchingEngine` in real time, with simulated time running `speedup` times faster.

The engine core is clock-free; this loop executes each step when its simulated start time
arrives, then sleeps until the next one (or until a new request wakes it). Every event
(first token, finish, blocks stored/evicted) is delivered at the wall-clock moment that
corresponds to its simulated time, so a caller sees the latencies the model predicts,
compressed by `speedup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

from kvmesh.services.enginesim.engine import BatchingEngine, EngineEvent, EventKind, SimRequest
from kvmesh.tasks import cancel_and_wait

log = logging.getLogger("kvmesh.enginesim")

EventSink = Callable[[EngineEvent], None]


class EngineRunner:
    """Owns the engine's step loop; `submit` hands in a request and returns when it finishes."""

    def __init__(self, engine: BatchingEngine, speedup: float = 1.0, on_event: EventSink | None = None) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self.engine = engine
        self.speedup = speedup
        self._on_event = on_event
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._done: dict[str, asyncio.Future[SimRequest]] = {}
        # Pending deliveries by number: TimerHandle's __eq__ compares arguments, so a set of handles
        # whose arguments refer back to them recursed without end when two fell due at once.
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._timer_ids = itertools.count()

    def now_ms(self) -> float:
        """Simulated milliseconds since start."""
        return (asyncio.get_running_loop().time() - self._t0) * 1000.0 * self.speedup

    def _wall(self, sim_ms: float) -> float:
        return self._t0 + sim_ms / 1000.0 / self.speedup

    async def start(self) -> None:
        if self._task is None:
            self._t0 = asyncio.get_running_loop().time()
            self._task = asyncio.create_task(self._loop(), name="enginesim-steps")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for fut in self._done.values():
            if not fut.done():
                fut.cancel()
        self._done.clear()

    def submit(self, request: SimRequest, local_hit_blocks: int, pool_hit_blocks: int) -> asyncio.Future[SimRequest]:
        """Queues the request now; the future resolves (at its simulated finish time) with it."""
        if request.request_id in self._done:
            raise ValueError(f"request {request.request_id!r} is already running")
        fut: asyncio.Future[SimRequest] = asyncio.get_running_loop().create_future()
        self._done[request.request_id] = fut
        now = self.now_ms()
        request.arrival_ms = now
        self.engine.submit(request, now, local_hit_blocks, pool_hit_blocks)
        self._wake.set()
        return fut

    def forget(self, request_id: str) -> None:
        """The caller gave up waiting (the request still runs to completion in the engine)."""
        self._done.pop(request_id, None)

    def _deliver(self, timer: int, event: EngineEvent) -> None:
        self._timers.pop(timer, None)
        if event.kind is EventKind.FINISHED and event.request is not None:
            fut = self._done.pop(event.request.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(event.request)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.warning("event handler failed", exc_info=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for event in self.engine.run_until(self.now_ms() + 1e-6):
                timer = next(self._timer_ids)
                self._timers[timer] = loop.call_at(self._wall(event.time_ms), self._deliver, timer, event)
            nxt = self.engine.next_activity_ms()
            self._wake.clear()
            timeout = None if nxt is None else max(0.0, (nxt - self.now_ms()) / 1000.0 / self.speedup)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
