"""How a plug-in reaches the mesh: the metadata service's address (the cache nodes are followed
through it) or a static node list, as users write them in a third-party configuration."""

from __future__ import annotations

import os
from typing import Any

from kvmesh.client.cache import CacheClient, NodeInfo

METADATA_ENV = "KVMESH_METADATA"
NODES_ENV = "KVMESH_NODES"
NAMESPACE_ENV = "KVMESH_NAMESPACE"


def parse_nodes(text: str) -> list[NodeInfo]:
    """`id=host:port,id=host:port` (or bare `host:port`, named by address) → NodeInfo list."""
    nodes: list[NodeInfo] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        node_id, sep, address = item.partition("=")
        if not sep:
            node_id, address = item, item
        if ":" not in address:
            raise ValueError(f"kvmesh node {item!r} is not ID=HOST:PORT")
        nodes.append(NodeInfo(node_id.strip(), address.strip()))
    return nodes


async def open_client(metadata: str | None, nodes: str | None, namespace: str, *,
                      sync_timeout_s: float = 10.0, **kwargs: Any) -> CacheClient:
    """A `CacheClient` following the metadata service at `metadata` (comma-separated replicas),
    else over the static `nodes`; falls back to `KVMESH_METADATA` / `KVMESH_NODES`."""
    metadata = metadata or os.environ.get(METADATA_ENV) or None
    nodes = nodes or os.environ.get(NODES_ENV) or None
    if metadata:
        return await CacheClient.connect(metadata, sync_timeout_s=sync_timeout_s, namespace=namespace, **kwargs)
    if nodes:
        return await CacheClient.from_nodes(parse_nodes(nodes), namespace=namespace, **kwargs)
    raise ValueError(f"kvmesh: no mesh address (set the metadata address, or {METADATA_ENV} / {NODES_ENV})")
