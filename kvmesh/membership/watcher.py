"""Follows `Membership.Watch(role)` and keeps the current member set.

Every change reaches the callback as a diff (joined, left, updated), including after a
reconnect: a SNAPSHOT is compared with what was known, so a consumer such as the router's
`update_pod_set` sees only what changed. A broken stream is re-established with backoff,
resuming from the last revision so no event is lost or repeated. A SNAPSHOT sent in pages
(`more` set on all but the last) is assembled before it is applied. While the stream is
broken `members` keeps the last known set and `stale` says so (with `stale_since`), so a
consumer can keep serving from it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from kvmesh.backoff import Backoff
from kvmesh.runtime.channels import open_channel
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc

log = logging.getLogger("kvmesh.membership")


@dataclass
class MembershipChange:
    """What changed in the member set at one revision."""

    revision: int
    joined: list[common_pb2.Member] = field(default_factory=list)
    left: list[common_pb2.Member] = field(default_factory=list)
    updated: list[common_pb2.Member] = field(default_factory=list)
    snapshot: bool = False

    def __bool__(self) -> bool:
        return bool(self.joined or self.left or self.updated)


ChangeCallback = Callable[[MembershipChange], Awaitable[None] | None]


class MembershipWatcher:
    """Keeps `members` (id → Member) in step with the metadata service for one role."""

    def __init__(
        self,
        metadata_addresses: Sequence[str],
        role: int = common_pb2.ROLE_UNSPECIFIED,
        on_change: ChangeCallback | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if not metadata_addresses:
            raise ValueError("at least one metadata address is needed")
        self._addresses = list(metadata_addresses)
        self._role = role
        self._on_change = on_change
        self._backoff = backoff or Backoff(base_s=0.05, cap_s=2.0)
        self.members: dict[str, common_pb2.Member] = {}
        self.revision = 0
        self.reconnects = 0
        self.stale_since: float | None = None  # loop time the stream broke; None while it is live
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._index = 0

    async def start(self) -> None:
        """Starts following (safe to call twice)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"membership-watch-{self._role}")

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Waits for the first snapshot."""
        await asyncio.wait_for(self._synced.wait(), timeout)

    @property
    def stale(self) -> bool:
        """True while the watch stream is broken: `members` is the last set known."""
        return self.stale_since is not None

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _apply(self, event: metadata_pb2.MembershipEvent) -> MembershipChange:
        change = MembershipChange(revision=event.revision)
        if event.type == metadata_pb2.SNAPSHOT:
            change.snapshot = True
            fresh = {m.id: m for m in event.members}
            for mid, old in self.members.items():
                if mid not in fresh:
                    change.left.append(old)
            for mid, m in fresh.items():
                known = self.members.get(mid)
                if known is None:
                    change.joined.append(m)
                elif known != m:
                    change.updated.append(m)
            self.members = fresh
        elif event.type == metadata_pb2.JOIN or event.type == metadata_pb2.UPDATE:
            for m in event.members:
                (change.updated if m.id in self.members else change.joined).append(m)
                self.members[m.id] = m
        elif event.type == metadata_pb2.LEAVE:
            for m in event.members:
                if m.id in self.members:
                    change.left.append(self.members.pop(m.id))
        if event.type == metadata_pb2.SNAPSHOT:
            # A snapshot restarts the history: after a backend lost its data its revisions
            # may be lower than the last one seen, and resuming must start from the new ones.
            self.revision = event.revision
        elif event.revision:
            self.revision = max(self.revision, event.revision)
        return change

    async def _deliver(self, change: MembershipChange) -> None:
        if self._on_change is None or not (change or change.snapshot):
            return
        result = self._on_change(change)
        if inspect.isawaitable(result):
            await result

    async def _run(self) -> None:
        attempt = 0
        while True:
            if self._channel is None:
                self._channel = open_channel(self._addresses[self._index % len(self._addresses)])
            stub = metadata_pb2_grpc.MembershipStub(self._channel)
            try:
                request = metadata_pb2.WatchRequest(role=self._role, start_revision=self.revision)  # type: ignore[arg-type]
                pages: list[common_pb2.Member] | None = None  # a SNAPSHOT arriving in pages
                async for event in stub.Watch(request):
                    attempt = 0
                    if event.type == metadata_pb2.SNAPSHOT and (event.more or pages is not None):
                        pages = [*(pages or []), *event.members]
                        if event.more:
                            continue
                        event = metadata_pb2.MembershipEvent(
                            type=metadata_pb2.SNAPSHOT, members=pages, revision=event.revision
                        )
                        pages = None
                    self.stale_since = None
                    change = self._apply(event)
                    await self._deliver(change)
                    if event.type == metadata_pb2.SNAPSHOT or self.revision:
                        self._synced.set()
                raise grpc.aio.AioRpcError(  # the server ended the stream: reconnect
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "watch stream ended"
                )
            except grpc.aio.AioRpcError as exc:
                if self.stale_since is None:
                    self.stale_since = asyncio.get_running_loop().time()
                self.reconnects += 1
                log.debug("watch broken (%s); reconnecting from revision %d", exc.code(), self.revision)
                await self._channel.close()
                self._channel = None
                self._index += 1
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
