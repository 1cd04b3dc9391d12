"""Sends the engine's KV events (blocks stored, removed) to the router over `ReportEvents`.

One long-lived client stream per router. Events are queued without blocking the engine; a
broken stream is re-opened with full-jitter backoff, and after a reconnect the router is
first told `cleared` and then the engine's whole current cache, because events sent while it
was unreachable are lost (the router then holds an exact copy again instead of drifting). On
every stream, the first included, the cache is sent once more a little later, in case the
router did not know this member yet when the first events arrived.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from kvmesh.backoff import Backoff
from kvmesh.runtime.channels import open_channel
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger("kvmesh.enginesim.events")

SnapshotFn = Callable[[], list[list[int]]]
RoutersFn = Callable[[], Sequence[str]]


class EventReporter:
    """Queues KV events and streams them to every router `routers()` names."""

    def __init__(
        self,
        member_id: str,
        routers: RoutersFn,
        snapshot: SnapshotFn,
        max_batch: int = 256,
        max_queue: int = 100_000,
        backoff: Backoff | None = None,
        late_resync_s: float = 2.0,
    ) -> None:
        self.member_id = member_id
        self._routers = routers
        self._snapshot = snapshot
        self._max_batch = max_batch
        self._queues: dict[str, asyncio.Queue[router_pb2.KvEvent]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._max_queue = max_queue
        self._backoff = backoff or Backoff(base_s=0.1, cap_s=2.0)
        self._late_resync_s = late_resync_s
        self.sent = 0
        self.dropped = 0

    def stored(self, chain: Sequence[int]) -> None:
        if chain:
            self._put(router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=0, ids=list(chain))))

    def removed(self, ids: Sequence[int]) -> None:
        if ids:
            self._put(router_pb2.KvEvent(removed=router_pb2.BlocksRemoved(ids=list(ids))))

    def _put(self, event: router_pb2.KvEvent) -> None:
        self.sync_routers()
        for queue in self._queues.values():
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1

    def sync_routers(self) -> None:
        """Opens a stream to each router now known, closes streams to routers gone."""
        wanted = set(self._routers())
        for address in wanted - self._tasks.keys():
            self._queues[address] = asyncio.Queue(self._max_queue)
            self._tasks[address] = asyncio.create_task(self._stream(address), name=f"kv-events-{address}")
        for address in self._tasks.keys() - wanted:
            self._tasks.pop(address).cancel()
            self._queues.pop(address, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._queues.clear()
        await cancel_and_wait(*tasks)

    def _snapshot_batches(self, cleared: bool) -> list[router_pb2.KvEventBatch]:
        events = [router_pb2.KvEvent(cleared=router_pb2.AllBlocksCleared())] if cleared else []
        events += [
            router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=0, ids=chain)) for chain in self._snapshot()
        ]
        return [
            router_pb2.KvEventBatch(member_id=self.member_id, events=events[i : i + self._max_batch])
            for i in range(0, len(events), self._max_batch)
        ]

    async def _batches(self, queue: asyncio.Queue[router_pb2.KvEvent], resync: bool) -> AsyncIterator[
        router_pb2.KvEventBatch
    ]:
        if resync:
            for batch in self._snapshot_batches(cleared=True):
                yield batch
        # A router that just started (or this engine, just joined) may not know this member
        # yet: its membership watch races our stream, and it ignores events from unknown
        # members. Say the whole cache once more a little later, on every stream.
        late_resync: float | None = asyncio.get_running_loop().time() + self._late_resync_s
        while True:
            if late_resync is not None:
                try:
                    left = late_resync - asyncio.get_running_loop().time()
                    first = await asyncio.wait_for(queue.get(), max(left, 0.0))
                except TimeoutError:
                    late_resync = None
                    for batch in self._snapshot_batches(cleared=False):
                        yield batch
                    continue
            else:
                first = await queue.get()
            events = [first]
            while len(events) < self._max_batch and not queue.empty():
                events.append(queue.get_nowait())
            self.sent += len(events)
            yield router_pb2.KvEventBatch(member_id=self.member_id, events=events)

    async def _stream(self, address: str) -> None:
        queue = self._queues[address]
        attempt = 0
        resync = False
        while True:
            channel = open_channel(address)
            try:
                stub = router_pb2_grpc.RouterStub(channel)
                await stub.ReportEvents(self._batches(queue, resync))
                attempt = 0
            except grpc.aio.AioRpcError as exc:
                log.debug("router %s event stream broke: %s", address, exc.code())
            finally:
                await channel.close()
            resync = True
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1
