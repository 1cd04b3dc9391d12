"""Per-namespace byte quotas: how much one tenant may keep on this cache node.

Storages do not count bytes per namespace (and evict or expire values on their own), so the node
keeps its own ledger: each write is charged, by key, before anything is reserved or written, and a
delete refunds its key. A write that would take the namespace past its quota is refused
RESOURCE_EXHAUSTED and nothing is written. Values the storage dropped by itself (eviction, TTL) or
writes that failed after their charge stay in the ledger until a reconciliation asks the storage
which keys still exist; that runs before an async caller is refused, and in the background (one at
a time per namespace) after a caller that cannot wait (the data plane, the zero-copy path) is.
The ledger only exists for namespaces with a quota, so a node without quotas pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.tasks import cancel_and_wait
from kvmesh.units import format_size

log = logging.getLogger("kvmesh.cachenode.quotas")

RECONCILE_BATCH = 4096  # keys per `exists` call while reconciling


class NamespaceQuotas:
    """The byte ledger of every namespace that has a quota (`default` bytes, or its override; 0: none)."""

    def __init__(self, default: int = 0, overrides: Mapping[str, int] | None = None,
                 storage: Callable[[], Storage | None] | None = None) -> None:
        self.default = default
        self.overrides = dict(overrides or {})
        self._storage = storage or (lambda: None)
        self._held: dict[str, dict[bytes, int]] = {}
        self._used: dict[str, int] = {}
        self._reconciling: dict[str, asyncio.Task[None]] = {}

    def limit(self, namespace: str) -> int:
        """The namespace's quota in bytes (0: none)."""
        return self.overrides.get(namespace, self.default)

    @property
    def active(self) -> bool:
        return bool(self.default or any(self.overrides.values()))

    def used(self, namespace: str) -> int:
        return self._used.get(namespace, 0)

    def charge(self, namespace: str, items: Sequence[tuple[bytes, int]]) -> None:
        """Charges (key, size) writes to the namespace, or raises ResourceExhausted and charges nothing."""
        limit = self.limit(namespace)
        if not limit:
            return
        held = self._held.get(namespace, {})
        sizes = {bytes(key): size for key, size in items}  # a key written twice counts once (the last)
        after = self.used(namespace) + sum(sizes.values()) - sum(held.get(k, 0) for k in sizes)
        if after > limit:
            self.reconcile_later(namespace)
            raise ResourceExhausted(
                f"namespace {namespace!r} would hold {format_size(after)} on this node, over its quota of "
                f"{format_size(limit)} (--namespace-quota-bytes / --namespace-quotas)"
            )
        held = self._held.setdefault(namespace, held)
        for key, size in sizes.items():
            held[key] = size
        self._used[namespace] = after

    async def charge_or_reconcile(self, namespace: str, items: Sequence[tuple[bytes, int]]) -> None:
        """`charge`, asking the storage which charged keys it still holds before refusing."""
        try:
            self.charge(namespace, items)
        except ResourceExhausted:
            await self.reconcile(namespace)
            self.charge(namespace, items)

    def refund(self, namespace: str, key: bytes) -> None:
        """The key was deleted: its bytes no longer count. (A write that failed after its charge is
        left to reconciliation: the key may still hold an older value, which must keep counting.)"""
        held = self._held.get(namespace)
        if held is None:
            return
        size = held.pop(bytes(key), None)
        if size is not None:
            self._used[namespace] -= size
        if not held:
            self._held.pop(namespace, None)
            self._used.pop(namespace, None)

    async def reconcile(self, namespace: str) -> None:
        """Drops the keys the storage no longer holds (evicted, expired, failed) from the ledger."""
        await asyncio.shield(self._start(namespace))

    def reconcile_later(self, namespace: str) -> None:
        """Starts a reconciliation without waiting for it (callers that cannot await)."""
        if self._held.get(namespace):
            self._start(namespace)

    def _start(self, namespace: str) -> asyncio.Task[None]:
        task = self._reconciling.get(namespace)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._reconcile(namespace), name="kvmesh-quota-reconcile")
            self._reconciling[namespace] = task
            task.add_done_callback(lambda _: self._reconciling.pop(namespace, None))
        return task

    async def _reconcile(self, namespace: str) -> None:
        storage = self._storage()
        held = self._held.get(namespace)
        if storage is None or not held:
            return
        keys = list(held)
        gone: list[bytes] = []
        try:
            for start in range(0, len(keys), RECONCILE_BATCH):
                batch = keys[start : start + RECONCILE_BATCH]
                present = await storage.exists(namespace, batch)
                gone.extend(k for k, here in zip(batch, present, strict=True) if not here)
        except Exception:
            log.warning("quota reconciliation of namespace %r failed", namespace, exc_info=True)
            return
        for key in gone:
            self.refund(namespace, key)
        if gone:
            log.debug("quota of namespace %r: %d keys no longer stored", namespace, len(gone))

    async def close(self) -> None:
        """Stops reconciliations in progress (the node is closing)."""
        for task in list(self._reconciling.values()):
            await cancel_and_wait(task)
        self._reconciling.clear()
