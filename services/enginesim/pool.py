"""The engine simulator's view of the cache pool: fetch a prompt's missing prefix, offload new blocks.

Blocks travel as real bytes (`--block-bytes` each) through the client library, so a replay
exercises the cache nodes' data path. Each value is derived from its key, so a fetched block
is checked byte for byte: a block that comes back wrong counts as a miss, never as a hit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from kvmesh.blocks import BlockHasher

log = logging.getLogger("kvmesh.enginesim.pool")


class BlockStore(Protocol):
    """The part of the cache client the simulator uses."""

    async def exists_prefix(self, keys: Sequence[bytes]) -> int: ...

    async def batch_get(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def batch_put(self, items: Sequence[tuple[bytes, bytes]]) -> int: ...


def block_value(key: bytes, size: int) -> bytes:
    """The bytes stored for a block: its key repeated (cheap to make, checkable on read)."""
    reps = -(-size // len(key))
    return (key * reps)[:size]


class BlockPool:
    """Fetches and offloads a prompt's blocks (by router block id) through a `BlockStore`."""

    def __init__(self, store: BlockStore, hasher: BlockHasher, block_bytes: int) -> None:
        self.store = store
        self.hasher = hasher
        self.block_bytes = block_bytes
        self.fetched_blocks = 0
        self.offloaded_blocks = 0
        self.bad_blocks = 0

    async def fetch_prefix(self, blocks: Sequence[int]) -> int:
        """Copies the longest run of `blocks` the pool holds; returns how many arrived intact."""
        if not blocks:
            return 0
        keys = self.hasher.id_keys(blocks)
        present = await self.store.exists_prefix(keys)
        if present <= 0:
            return 0
        values = await self.store.batch_get(keys[:present])
        n = 0
        for key, value in zip(keys, values, strict=False):
            if value is None:
                break
            if value != block_value(key, self.block_bytes):
                self.bad_blocks += 1
                break
            n += 1
        self.fetched_blocks += n
        return n

    async def offload(self, blocks: Sequence[int]) -> int:
        """Stores `blocks` in the pool; returns how many were stored."""
        if not blocks:
            return 0
        keys = self.hasher.id_keys(blocks)
        stored = await self.store.batch_put([(k, block_value(k, self.block_bytes)) for k in keys])
        self.offloaded_blocks += stored
        return stored
