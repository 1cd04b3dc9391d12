"""The cache pool reached through the client library (`kvmesh.client.CacheClient`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from kvmesh.client import CacheClient
from kvmesh.services.enginesim.pool import BlockStore
from kvmesh.services.enginesim.settings import EngineSimSettings


class ClientStore:
    """`BlockStore` over a `CacheClient` that follows the cache nodes of the mesh."""

    def __init__(self, client: CacheClient) -> None:
        self.client = client

    async def exists_prefix(self, keys: Sequence[bytes]) -> int:
        return await self.client.exists_prefix(keys)

    async def batch_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return await self.client.get_many(keys)

    async def batch_put(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        return await self.client.put_many(items)


async def connect_pool(settings: EngineSimSettings) -> tuple[BlockStore, Callable[[], Awaitable[None]]]:
    """Connects to the cache nodes registered with the metadata service; returns the store and its closer."""
    client = await CacheClient.connect(
        settings.metadata_addresses, namespace=settings.namespace, max_message_bytes=settings.max_message_bytes
    )
    return ClientStore(client), client.close
