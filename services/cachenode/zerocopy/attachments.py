"""Data-path sessions: what each attached client holds, and the rules that keep it safe.

A session owns its pending allocations (reserved extents the client is writing) and its
views (pinned values the client is reading). Every id is checked against the session that
presents it, so one client can never seal or release another's. When a session ends (its
Attach stream broke because the client exited or died) every pin is released and every
unsealed allocation is aborted; unsealed allocations also expire on their own after the
allocation timeout, so a client that never seals leaks nothing.

Pins are bounded three ways, so that no client can make every put fail by pinning the
whole storage: views per session, bytes pinned by all sessions together (a share of the
storage's capacity: the rest can always be evicted for new values), and time (a view not
released within its lease is released by the node). Sessions are bounded in number too. A
value deleted or replaced while pinned is freed when its last pin goes.

Everything runs on the event loop thread without awaiting, like the memory storage, so no
lock is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmesh.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from kvmesh.security.identity import Principal
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.storage.base import Pinned, ZeroCopyStorage
from kvmesh.services.cachenode.storage.write import ReservedWrite
from kvmesh.services.cachenode.zerocopy.exports import TRANSPORT_NAMES, Export

log = logging.getLogger("kvmesh.cachenode.zerocopy")

# How many finished allocation / released view ids a session remembers, to answer
# "already sealed" or "already released" instead of a bare "unknown id".
RECENT_IDS = 4096


@dataclass(frozen=True)
class ZeroCopyLimits:
    """Per-node limits of the zero-copy path: the node's request limits (the same checks as
    every other data plane), plus what one attachment may hold."""

    requests: Limits = field(default_factory=Limits)
    allocation_timeout_s: float = 30.0
    max_pending_allocations: int = 4096  # per attachment
    max_views: int = 4096  # per attachment
    max_sessions: int = 256
    max_pinned_fraction: float = 0.5  # of the storage's capacity, over all sessions
    view_lease_s: float = 60.0  # a view held longer is released by the node


@dataclass
class HeldView:
    pinned: Pinned
    deadline: float  # monotonic time after which the node releases it


@dataclass
class Allocation:
    id: int
    write: ReservedWrite  # the client fills its region; Seal commits or aborts it
    deadline: float  # monotonic time after which it is dropped


class _Recent:
    """A bounded id → outcome memory (oldest forgotten first)."""

    def __init__(self, limit: int = RECENT_IDS) -> None:
        self._limit = limit
        self._items: OrderedDict[int, str] = OrderedDict()

    def add(self, ident: int, outcome: str) -> None:
        self._items[ident] = outcome
        if len(self._items) > self._limit:
            self._items.popitem(last=False)

    def get(self, ident: int) -> str | None:
        return self._items.get(ident)


@dataclass
class Attachment:
    """One attached client."""

    id: str
    client_id: str
    export: Export
    allocations: dict[int, Allocation] = field(default_factory=dict)
    views: dict[int, HeldView] = field(default_factory=dict)  # in acquisition order
    finished_allocations: _Recent = field(default_factory=_Recent)
    released_views: _Recent = field(default_factory=_Recent)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    on_end: list[Callable[[], None]] = field(default_factory=list)  # e.g. close its control connection
    principal: Principal | None = None  # who attached (with a policy): the session acts as it

    @property
    def transport_name(self) -> str:
        return TRANSPORT_NAMES.get(self.export.transport, str(self.export.transport))


class AttachmentTable:
    """All sessions of one node, over its zero-copy storage."""

    def __init__(self, storage: ZeroCopyStorage, exports: dict[int, Export], limits: ZeroCopyLimits) -> None:
        self.storage = storage
        self.exports = exports
        self.limits = limits
        self._sessions: dict[str, Attachment] = {}
        self._ids = itertools.count(1)  # allocation and view ids, unique across the node
        self.expired = 0  # allocations dropped by the timeout (for tests and stats)
        self.expired_views = 0  # views released by the node at the end of their lease
        self.pinned_bytes = 0  # bytes held by every session's views
        self.max_pinned_bytes = max(1, int(storage.capacity_bytes * limits.max_pinned_fraction))

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, client_id: str, transport: int,  # transport: cachenode_pb2.Transport
             principal: Principal | None = None) -> Attachment:
        export = self.exports.get(transport)
        if export is None:
            offered = ", ".join(TRANSPORT_NAMES[t] for t in sorted(self.exports)) or "none"
            if transport not in TRANSPORT_NAMES:
                raise InvalidArgument(f"unknown data-path transport {transport}")
            wanted = TRANSPORT_NAMES[transport]
            raise FailedPrecondition(
                f"this node's storage cannot serve the {wanted} data path (offered: {offered}); "
                "use memory://?arena=shm for shm or rdma:// for rdma"
            )
        if len(self._sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(
                f"this node already serves {self.limits.max_sessions} data-path sessions (--max-sessions)"
            )
        # 128 random bits: the id is the capability the local control socket's HELLO presents.
        session = Attachment(id=secrets.token_hex(16), client_id=client_id[:256], export=export, principal=principal)
        self._sessions[session.id] = session
        log.debug("session %s attached (client %s, %s)", session.id, session.client_id, session.transport_name)
        return session

    def get(self, session_id: str) -> Attachment:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"unknown data-path session {session_id!r} (never attached, or its Attach stream ended)")
        return session

    def end(self, session: Attachment) -> None:
        """Releases everything the session held; safe to call twice."""
        if self._sessions.pop(session.id, None) is None:
            return
        for allocation in session.allocations.values():
            allocation.write.abort()
        for held in session.views.values():
            self._unpin(held)
        if session.allocations or session.views:
            log.info(
                "session %s (client %s) ended holding %d views and %d unsealed allocations: released",
                session.id, session.client_id, len(session.views), len(session.allocations),
            )
        session.allocations.clear()
        session.views.clear()
        session.ended.set()
        callbacks, session.on_end = session.on_end, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        for session in list(self._sessions.values()):
            self.end(session)

    def _unpin(self, held: HeldView) -> None:
        if not held.pinned.released:
            self.pinned_bytes -= held.pinned.size
            held.pinned.release()

    # -- writes --------------------------------------------------------------------------

    def allocate(
        self, session: Attachment, namespace: str, items: Sequence[tuple[bytes, int]], ttl_seconds: int
    ) -> list[Allocation]:
        """Reserves space for every (key, size), or for none: a failure aborts what was reserved."""
        requests = self.limits.requests
        requests.check_namespace(namespace)
        if not items:
            raise InvalidArgument("nothing to allocate")
        for key, size in items:
            requests.check_key(key)
            requests.check_size(size)
        limit = self.limits.max_pending_allocations
        if len(session.allocations) + len(items) > limit:
            raise ResourceExhausted(
                f"session would hold more than {limit} unsealed allocations: seal or abort some first"
            )
        deadline = time.monotonic() + self.limits.allocation_timeout_s
        reserved: list[ReservedWrite] = []
        try:
            for key, size in items:
                reserved.append(self.storage.begin_write(namespace, bytes(key), size, ttl_seconds))
        except BaseException:
            for write in reserved:
                write.abort()
            raise
        out = [Allocation(next(self._ids), write, deadline) for write in reserved]
        for allocation in out:
            session.allocations[allocation.id] = allocation
        return out

    def seal(self, session: Attachment, allocation_ids: Sequence[int], abort: bool) -> list[tuple[str, bytes]]:
        """Publishes (or drops) allocations; every id is checked before any is sealed.

        Returns the (namespace, key) of each value published.
        """
        if not allocation_ids:
            raise InvalidArgument("no allocation to seal")
        if len(set(allocation_ids)) != len(allocation_ids):
            raise InvalidArgument("an allocation is listed twice")
        for allocation_id in allocation_ids:
            if allocation_id in session.allocations:
                continue
            outcome = session.finished_allocations.get(allocation_id)
            if outcome is not None:
                raise FailedPrecondition(f"allocation {allocation_id} is no longer open: it was {outcome}")
            raise NotFound(f"unknown allocation {allocation_id} in session {session.id}")
        published: list[tuple[str, bytes]] = []
        for allocation_id in allocation_ids:
            allocation = session.allocations.pop(allocation_id)
            if abort:
                allocation.write.abort()
                session.finished_allocations.add(allocation_id, "aborted")
            else:
                allocation.write.publish()
                session.finished_allocations.add(allocation_id, "sealed")
                published.append((allocation.write.namespace, allocation.write.key))
        return published

    def expire(self, now: float | None = None) -> int:
        """Drops unsealed allocations past their deadline; returns how many."""
        now = time.monotonic() if now is None else now
        dropped = 0
        timeout_ms = int(self.limits.allocation_timeout_s * 1000)
        for session in self._sessions.values():
            late = [a for a in session.allocations.values() if a.deadline <= now]
            for allocation in late:
                del session.allocations[allocation.id]
                allocation.write.abort()
                session.finished_allocations.add(allocation.id, f"dropped: not sealed within {timeout_ms} ms")
                dropped += 1
        if dropped:
            self.expired += dropped
            log.info("dropped %d allocations not sealed within %d ms", dropped, timeout_ms)
        return dropped + self.expire_views(now)

    def expire_views(self, now: float | None = None) -> int:
        """Releases views held past their lease (oldest first in each session); returns how many."""
        now = time.monotonic() if now is None else now
        lease_ms = int(self.limits.view_lease_s * 1000)
        released = 0
        for session in self._sessions.values():
            late = []
            for view_id, held in session.views.items():  # acquisition order = deadline order
                if held.deadline > now:
                    break
                late.append(view_id)
            for view_id in late:
                self._unpin(session.views.pop(view_id))
                session.released_views.add(view_id, f"expired: not released within {lease_ms} ms")
            released += len(late)
        if released:
            self.expired_views += released
            log.info("released %d views held past their %d ms lease", released, lease_ms)
        return released

    # -- reads ---------------------------------------------------------------------------

    def acquire(self, session: Attachment, namespace: str, keys: Sequence[bytes]) -> list[tuple[int, Pinned] | None]:
        self.limits.requests.check_namespace(namespace)
        self.limits.requests.check_keys(keys)
        if len(session.views) + len(keys) > self.limits.max_views:
            raise ResourceExhausted(
                f"session would hold more than {self.limits.max_views} views (--max-views-per-session): "
                "release some first"
            )
        out: list[tuple[int, Pinned] | None] = []
        deadline = time.monotonic() + self.limits.view_lease_s
        try:
            for key in keys:
                pinned = self.storage.pin(namespace, bytes(key))
                if pinned is None:
                    out.append(None)
                    continue
                if self.pinned_bytes + pinned.size > self.max_pinned_bytes:
                    pinned.release()
                    raise ResourceExhausted(
                        f"clients hold {self.pinned_bytes} bytes pinned, the node's limit is {self.max_pinned_bytes} "
                        "(--max-pinned-fraction of the storage): release views first"
                    )
                self.pinned_bytes += pinned.size
                view_id = next(self._ids)
                session.views[view_id] = HeldView(pinned, deadline)
                out.append((view_id, pinned))
        except BaseException:  # all or nothing: a refused batch holds no pin
            for held in out:
                if held is not None:
                    self._unpin(session.views.pop(held[0]))
            raise
        return out

    def release(self, session: Attachment, view_ids: Sequence[int]) -> int:
        """Releases views; all ids are checked first, so a bad id changes nothing.

        Views the node already released at the end of their lease are skipped (not counted):
        the client could not know, and its release must not fail the request it rides on.
        """
        seen: set[int] = set()
        live: list[int] = []
        for view_id in view_ids:
            if view_id in seen:
                raise InvalidArgument(f"view {view_id} listed twice")
            seen.add(view_id)
            if view_id in session.views:
                live.append(view_id)
                continue
            outcome = session.released_views.get(view_id)
            if outcome is not None and outcome.startswith("expired"):
                continue
            if outcome is not None:
                raise FailedPrecondition(f"view {view_id} was already released")
            raise NotFound(f"unknown view {view_id} in session {session.id}")
        for view_id in live:
            self._unpin(session.views.pop(view_id))
            session.released_views.add(view_id, "released")
        return len(live)
