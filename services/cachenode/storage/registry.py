"""The one place that maps a storage URI scheme to its class, imported only when chosen.

A node without CUDA, RDMA or Vineyard never imports those libraries. `--storage` takes one
URI or a comma-separated tier list (L1 first); `build_storage` returns a single storage
either way (a tier list is itself a storage).
"""

from __future__ import annotations

from kvmesh.registry import LazyRegistry
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.tiers import STORAGE_SCHEMES, split_tiers
from kvmesh.uri import UriError, parse_uri

STORAGE_BACKENDS: LazyRegistry[Storage] = LazyRegistry("storage")
STORAGE_BACKENDS.register("memory", "kvmesh.services.cachenode.storage.memory", "MemoryStorage")
STORAGE_BACKENDS.register("disk", "kvmesh.services.cachenode.storage.disk", "DiskStorage")
STORAGE_BACKENDS.register("redis", "kvmesh.services.cachenode.storage.redis", "RedisStorage")
STORAGE_BACKENDS.register("rediss", "kvmesh.services.cachenode.storage.redis", "RedisStorage")
STORAGE_BACKENDS.register("redis+cluster", "kvmesh.services.cachenode.storage.redis", "RedisClusterStorage")
STORAGE_BACKENDS.register("vineyard", "kvmesh.services.cachenode.storage.vineyard", "VineyardStorage")
STORAGE_BACKENDS.register("gpu", "kvmesh.services.cachenode.storage.gpu", "GpuStorage")
STORAGE_BACKENDS.register("rdma", "kvmesh.services.cachenode.storage.rdma", "RdmaStorage")
assert set(STORAGE_BACKENDS.schemes()) == STORAGE_SCHEMES, "kvmesh.tiers.STORAGE_SCHEMES and the registry disagree"



async def build_storage(spec: str) -> Storage:
    """One storage from `--storage`: a URI, or 'L1,L2[,L3]' which becomes a tiered storage.

    In a tier list, `write=through|back` on the L1 URI says when lower tiers get written.
    """
    uris = split_tiers(spec)
    if not uris:
        raise UriError("--storage is empty")
    tiers: list[Storage] = []
    write = "through"
    try:
        for index, text in enumerate(uris):
            uri = parse_uri(text)
            if index == 0 and len(uris) > 1:
                write = uri.param("write", "through") or "through"
                if write not in ("through", "back"):
                    raise UriError(f"{uri.redacted()}: write must be 'through' or 'back', got {write!r}")
            tiers.append(await STORAGE_BACKENDS.resolve(uri.scheme).create(uri))
    except BaseException:
        for storage in tiers:
            await storage.close()
        raise
    if len(tiers) == 1:
        return tiers[0]
    from kvmesh.services.cachenode.storage.tiered import TieredStorage

    return TieredStorage(tiers, write=write)
