"""A tier list (`--storage L1,L2[,L3]`) as one storage.

Reads look in L1 first and go down only for what is missing; a hit in a lower tier is
promoted into every tier above it, so the next read is served from L1. Writes go to L1 and
reach the lower tiers either at once (`write=through`, default: lower tiers always hold
everything, a node restart with a persistent L2 loses nothing) or when L1 evicts the value
(`write=back`: less write traffic to slow tiers; values still only in L1 are lost on a
crash). The mode is a parameter of the L1 URI: `memory://?capacity=1GiB&write=back,disk:///x`.

Demotions on eviction are queued (bounded) and written by one background task, because an
storage evicts synchronously while it makes room; when the queue is full the oldest
demotions are dropped, which for a cache only costs a future miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from kvmesh.services.cachenode.storage.base import Capabilities, Storage, StorageStats, ZeroCopyStorage
from kvmesh.tasks import cancel_and_wait

log = logging.getLogger("kvmesh.cachenode.tiered")

WRITE_MODES = ("through", "back")
DEMOTION_QUEUE = 1024


class TieredStorage(Storage):
    """L1 → L2 → ... composed from tiers built by the registry."""

    scheme = "tiered"
    capabilities = Capabilities(batch=True, zero_copy=False, persistent=False, device_memory=False)

    def __init__(self, tiers: Sequence[Storage], write: str = "through") -> None:
        super().__init__()
        if len(tiers) < 2:
            raise ValueError("a tier list needs at least two tiers")
        if write not in WRITE_MODES:
            raise ValueError(f"write mode must be one of {', '.join(WRITE_MODES)}, got {write!r}")
        self.tiers = list(tiers)
        self.write_mode = write
        self._queue: asyncio.Queue[tuple[int, str, bytes, bytes]] | None = None
        self._demoter: asyncio.Task[None] | None = None
        self.demotions = 0
        self.demotions_dropped = 0
        self.promotions = 0
        self._closed = False
        if write == "back":
            for index, tier in enumerate(self.tiers[:-1]):
                tier.set_eviction_listener(self._demotion_listener(index + 1))

    @classmethod
    async def create(cls, uri: object) -> TieredStorage:
        raise TypeError("a tiered storage is built by build_storage from a comma-separated list")

    @property
    def name(self) -> str:
        return "tiered(" + " > ".join(t.name for t in self.tiers) + f"; write-{self.write_mode})"

    @property
    def capacity_bytes(self) -> int:
        # Lower tiers are normally the largest and (write-through) hold every value.
        return max(t.capacity_bytes for t in self.tiers)

    def stats(self) -> StorageStats:
        per_tier = self.tier_stats()
        return StorageStats(
            name=self.name,
            tier="all",
            used_bytes=per_tier[0].used_bytes,
            capacity_bytes=self.capacity_bytes,
            items=per_tier[0].items,
            hits=sum(s.hits for s in per_tier),
            misses=per_tier[-1].misses,
            evictions=per_tier[-1].evictions,
        )

    def tier_stats(self) -> list[StorageStats]:
        out = []
        for index, tier in enumerate(self.tiers):
            stats = tier.stats()
            stats.tier = f"L{index + 1}"
            out.append(stats)
        return out

    async def refresh_stats(self) -> None:
        for tier in self.tiers:
            await tier.refresh_stats()

    def mappable(self) -> ZeroCopyStorage | None:
        """Data-path clients map L1's memory (see zerocopy/api.py for how the tiers stay in step)."""
        return self.tiers[0].zero_copy()

    # -- write-on-eviction ---------------------------------------------------------------

    def _demotion_listener(self, target: int):  # type: ignore[no-untyped-def]
        def on_evicted(namespace: str, key: bytes, value: bytes) -> None:
            if self._closed:
                return
            if self._queue is None:
                self._queue = asyncio.Queue(maxsize=DEMOTION_QUEUE)
                self._demoter = asyncio.get_running_loop().create_task(self._demote(), name="kvmesh-tier-demoter")
            if self._queue.full():
                self._queue.get_nowait()
                self._queue.task_done()
                self.demotions_dropped += 1
            self._queue.put_nowait((target, namespace, key, value))

        return on_evicted

    async def _demote(self) -> None:
        assert self._queue is not None
        while True:
            target, namespace, key, value = await self._queue.get()
            try:
                await self.tiers[target].put(namespace, key, value)
                self.demotions += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("demotion to tier L%d failed", target + 1, exc_info=True)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Waits until queued demotions are written (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    # -- Storage --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        await self.put_many(namespace, [(key, value)], ttl_seconds)

    async def put_many(
        self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl_seconds: int = 0
    ) -> None:
        if self.write_mode == "back":
            await self.tiers[0].put_many(namespace, items, ttl_seconds)
            return
        # Through: the lowest tier first, so a value in L1 is always also below it.
        for tier in reversed(self.tiers):
            await tier.put_many(namespace, items, ttl_seconds)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        return (await self.get_many(namespace, [key]))[0]

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        found: list[bytes | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not missing:
                break
            values = await tier.get_many(namespace, [keys[i] for i in missing])
            hits = [(i, v) for i, v in zip(missing, values, strict=True) if v is not None]
            for i, value in hits:
                found[i] = value
            if hits and level > 0:
                await self._promote(level, namespace, [(keys[i], v) for i, v in hits])
            missing = [i for i, v in zip(missing, values, strict=True) if v is None]
        return found

    async def _promote(self, level: int, namespace: str, items: list[tuple[bytes, bytes]]) -> None:
        for tier in self.tiers[:level]:
            try:
                await tier.put_many(namespace, items)
            except Exception as exc:  # a full upper tier: the value is still served from below
                log.debug("promotion into %s skipped: %s", tier.name, exc)
                return
        self.promotions += len(items)

    async def delete(self, namespace: str, key: bytes) -> bool:
        deleted = False
        for tier in self.tiers:
            deleted = await tier.delete(namespace, key) or deleted
        return deleted

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        present = [False] * len(keys)
        missing = list(range(len(keys)))
        for tier in self.tiers:
            if not missing:
                break
            answers = await tier.exists(namespace, [keys[i] for i in missing])
            for i, hit in zip(missing, answers, strict=True):
                present[i] = hit
            missing = [i for i, hit in zip(missing, answers, strict=True) if not hit]
        return present

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._demoter is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush(), 5.0)
            await cancel_and_wait(self._demoter)
        for tier in self.tiers:
            await tier.close()
