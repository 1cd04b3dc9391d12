"""The one place that maps an engine URI scheme to its class, imported only when chosen.

A node without CUDA, RDMA or Vineyard never imports those libraries. `--engine` takes one
URI or a comma-separated tier list (L1 first); `build_engine` returns a single engine
either way (a tier list is itself an engine).
"""

from __future__ import annotations

from kvmesh.registry import LazyRegistry
from kvmesh.uri import UriError, parse_uri
from services.cachenode.engines.base import Engine

ENGINES: LazyRegistry[Engine] = LazyRegistry("engine")
ENGINES.register("memory", "services.cachenode.engines.memory", "MemoryEngine")
ENGINES.register("disk", "services.cachenode.engines.disk", "DiskEngine")
ENGINES.register("redis", "services.cachenode.engines.redis_engine", "RedisEngine")
ENGINES.register("rediss", "services.cachenode.engines.redis_engine", "RedisEngine")
ENGINES.register("redis+cluster", "services.cachenode.engines.redis_engine", "RedisClusterEngine")
ENGINES.register("vineyard", "services.cachenode.engines.vineyard_engine", "VineyardEngine")
ENGINES.register("gpu", "services.cachenode.engines.gpu", "GpuEngine")
ENGINES.register("rdma", "services.cachenode.engines.rdma", "RdmaEngine")


async def build_engine(spec: str) -> Engine:
    """One engine from `--engine`: a URI, or 'L1,L2[,L3]' which becomes a tiered engine."""
    uris = [part.strip() for part in spec.split(",") if part.strip()]
    if not uris:
        raise UriError("--engine is empty")
    engines: list[Engine] = []
    try:
        for text in uris:
            uri = parse_uri(text)
            engines.append(await ENGINES.resolve(uri.scheme).create(uri))
    except BaseException:
        for engine in engines:
            await engine.close()
        raise
    if len(engines) == 1:
        return engines[0]
    from services.cachenode.engines.tiered import TieredEngine

    return TieredEngine(engines)
