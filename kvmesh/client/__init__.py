"""The client library an inference engine embeds to offload and reuse KV-cache blocks."""

from kvmesh.client.cache import CacheClient, NodeInfo, node_infos
from kvmesh.client.hashring import HashRing

__all__ = ["CacheClient", "HashRing", "NodeInfo", "node_infos"]
