"""The one interface every metadata backend implements: a revisioned KV with leases.

Membership and the metadata KV are both built on this, so memory://, etcd:// and redis://
share every rule above the storage (validation, events, rate limits) and one contract
test suite. The model is etcd's: a global revision that grows with every change, keys
optionally bound to a lease (deleted when it expires or is revoked), compare-and-swap on a
key's mod revision, and a prefix watch that can resume after a revision while the
backend still retains the events after it.
"""

from __future__ import annotations

import asyncio
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from kvmesh.runtime.errors import NotFound, Unavailable
from kvmesh.tasks import cancel_and_wait
from kvmesh.uri import Uri


class Compacted(Exception):
    """The events after the requested revision are no longer retained (or never existed here)."""


class LeaseNotFound(NotFound):
    """The lease is unknown or has expired."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id} not found (unknown or expired)")
        self.lease_id = lease_id


@dataclass(frozen=True)
class Entry:
    """One stored key."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease_id: int = 0


@dataclass(frozen=True)
class Change:
    """One event of the change log.

    `created` tells a put of a new key from an overwrite. For a delete, `value` and
    `lease_id` are those of the deleted entry when the backend knows them.
    """

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int
    created: bool = False
    lease_id: int = 0


MAX_LEASE_ID = 2**63 - 1


def new_lease_id() -> int:
    """A random positive 63-bit lease id. Lease ids are bearer capabilities until the ownership
    check comes (docs/security.md): a guessable id (a clock plus a counter) let anyone renew or
    end another member's lease."""
    return secrets.randbelow(MAX_LEASE_ID) + 1


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix` ('' = no end)."""
    data = bytearray(prefix.encode())
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return bytes(data).decode(errors="surrogateescape")
        data.pop()
    return ""


class Store(ABC):
    """A revisioned key-value store with leases, CAS and resumable prefix watches.

    Implementations raise `kvmesh.runtime.errors.Unavailable` when the backend cannot be
    reached and `LeaseNotFound` for an unknown or expired lease; they never block the
    event loop.
    """

    @classmethod
    @abstractmethod
    async def create(cls, uri: Uri) -> Store:
        """Connects to the backend named by `uri` (async factory: no I/O in __init__)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Starts background work (expiry sweeps); safe to call twice."""

    @abstractmethod
    async def close(self) -> None:
        """Stops background work and closes connections."""

    @abstractmethod
    async def ping(self) -> None:
        """Raises Unavailable when the backend does not answer."""

    # Leases
    @abstractmethod
    async def grant(self, ttl_seconds: int) -> tuple[int, int]:
        """A new lease: (lease_id, granted ttl seconds)."""

    @abstractmethod
    async def refresh(self, lease_id: int) -> int:
        """Renews a lease for its full TTL; returns the TTL. LeaseNotFound when gone."""

    @abstractmethod
    async def revoke(self, lease_id: int) -> int:
        """Ends a lease at once, deleting its keys; returns the revision. LeaseNotFound when gone."""

    # Keys
    @abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abstractmethod
    async def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        """Writes a key (bound to `lease_id` when non-zero); returns the new revision."""

    @abstractmethod
    async def delete(self, key: str) -> tuple[bool, int]:
        """(deleted, revision)."""

    @abstractmethod
    async def range(self, prefix: str, limit: int = 0) -> tuple[list[Entry], int]:
        """Keys starting with `prefix` in key order (limit 0 = all) and the revision they were read at."""

    @abstractmethod
    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease_id: int = 0
    ) -> tuple[bool, int, Entry | None]:
        """Writes only if the key's mod revision is `expected_mod_revision` (0 = must not exist).

        Returns (succeeded, revision, current entry after the call).
        """

    @abstractmethod
    async def revision(self) -> int:
        """The current revision."""

    @abstractmethod
    def watch(self, prefix: str, after_revision: int) -> AsyncGenerator[Change, None]:
        """Changes to keys under `prefix` with revision > `after_revision`, in revision order.

        The first `__anext__` raises Compacted when those events are not all retained
        (including a revision this backend never reached). Runs until closed
        (`aclose()`); raises Unavailable when the backend goes away.
        """


class Sweeper:
    """A store's expiry loop: one `sweep` every `interval_s`, started by `start()`, ended by `stop()`.

    `stop()` both flags the loop and cancels it: a cancel that a Redis call loses (CPython
    3.11's wait_for, see kvmesh.tasks) still ends the loop as soon as that call returns.
    """

    def __init__(self, sweep: Callable[[], Coroutine[Any, Any, None]], interval_s: float, name: str) -> None:
        self._sweep = sweep
        self._interval_s = interval_s
        self._name = name
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def _loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval_s)
            if self._stopping:
                return
            await self._sweep()

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True
            await cancel_and_wait(self._task)
            self._task = None


class StoreHandle:
    """Where the APIs find the store: servicers are bound before the (async) store opens."""

    def __init__(self, store: Store | None = None) -> None:
        self._store = store

    def set(self, store: Store | None) -> None:
        self._store = store

    @property
    def store(self) -> Store:
        if self._store is None:
            raise Unavailable("metadata backend is not open yet")
        return self._store
