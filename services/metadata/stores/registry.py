"""The one place that maps a `--backend` URI scheme to its store class, imported only when chosen."""

from __future__ import annotations

from kvmesh.registry import LazyRegistry
from kvmesh.services.metadata.stores.base import Store
from kvmesh.uri import Uri, parse_uri

STORES: LazyRegistry[Store] = LazyRegistry("metadata backend")
STORES.register("memory", "kvmesh.services.metadata.stores.memory", "MemoryStore")
STORES.register("etcd", "kvmesh.services.metadata.stores.etcd", "EtcdStore")
STORES.register("etcds", "kvmesh.services.metadata.stores.etcd", "EtcdStore")
STORES.register("redis", "kvmesh.services.metadata.stores.redis_store", "RedisStore")
STORES.register("rediss", "kvmesh.services.metadata.stores.redis_store", "RedisStore")


def resolve_backend(spec: str) -> tuple[Uri, type[Store]]:
    """Parses and resolves `--backend` without connecting (raises UriError with a clear message)."""
    uri = parse_uri(spec)
    return uri, STORES.resolve(uri.scheme)


async def open_store(spec: str) -> Store:
    uri, cls = resolve_backend(spec)
    store = await cls.create(uri)
    await store.start()
    return store
