"""The one place that maps an engine URI scheme to its class, imported only when chosen.

A node without CUDA, RDMA or Vineyard never imports those libraries. `--engine` takes one
URI or a comma-separated tier list (L1 first); `build_engine` returns a single engine
either way (a tier list is itself an engine).
"""

from __future__ import annotations

import re

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


_TIER_BOUNDARY = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_tiers(spec: str) -> list[str]:
    """'L1,L2' → ['L1', 'L2']; a comma inside one URI (a redis+cluster host list) does not split."""
    return [part.strip() for part in _TIER_BOUNDARY.split(spec) if part.strip()]


async def build_engine(spec: str) -> Engine:
    """One engine from `--engine`: a URI, or 'L1,L2[,L3]' which becomes a tiered engine.

    In a tier list, `write=through|back` on the L1 URI says when lower tiers get written.
    """
    uris = split_tiers(spec)
    if not uris:
        raise UriError("--engine is empty")
    engines: list[Engine] = []
    write = "through"
    try:
        for index, text in enumerate(uris):
            uri = parse_uri(text)
            if index == 0 and len(uris) > 1:
                write = uri.param("write", "through") or "through"
                if write not in ("through", "back"):
                    raise UriError(f"{uri.redacted()}: write must be 'through' or 'back', got {write!r}")
            engines.append(await ENGINES.resolve(uri.scheme).create(uri))
    except BaseException:
        for engine in engines:
            await engine.close()
        raise
    if len(engines) == 1:
        return engines[0]
    from services.cachenode.engines.tiered import TieredEngine

    return TieredEngine(engines, write=write)
