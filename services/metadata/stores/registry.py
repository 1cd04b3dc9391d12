"""The one place that maps a `--backend` URI scheme to its store class, imported only when chosen."""

from __future__ import annotations

from kvmesh.registry import LazyRegistry
from kvmesh.uri import Uri, parse_uri
from services.metadata.stores.base import Store

STORES: LazyRegistry[Store] = LazyRegistry("metadata backend")
STORES.register("memory", "services.metadata.stores.memory", "MemoryStore")
STORES.register("etcd", "services.metadata.stores.etcd", "EtcdStore")
STORES.register("redis", "services.metadata.stores.redis_store", "RedisStore")
STORES.register("rediss", "services.metadata.stores.redis_store", "RedisStore")


def resolve_backend(spec: str) -> tuple[Uri, type[Store]]:
    """Parses and resolves `--backend` without connecting (raises UriError with a clear message)."""
    uri = parse_uri(spec)
    return uri, STORES.resolve(uri.scheme)


async def open_store(spec: str) -> Store:
    uri, cls = resolve_backend(spec)
    store = await cls.create(uri)
    await store.start()
    return store
