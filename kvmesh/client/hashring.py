"""Consistent hashing of cache keys onto cache nodes, weighted by capacity, with replicas.

Each node owns `vnodes * weight` points on a 64-bit ring (weight = its capacity
relative to the mean), so a node with twice the capacity receives about twice the keys. A
key belongs to the first `replicas` distinct nodes clockwise from its hash. Adding one node
to N moves only the keys it now owns first — about 1/(N+1) of them — and removing one moves
only its keys.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Mapping

_U64 = struct.Struct("<Q")
DEFAULT_VNODES = 160


def _point(data: bytes) -> int:
    return int(_U64.unpack(hashlib.blake2b(data, digest_size=8).digest())[0])


class HashRing:
    """An immutable ring over `{node_id: capacity}`; build a new one when membership changes."""

    def __init__(self, capacities: Mapping[str, int], vnodes: int = DEFAULT_VNODES) -> None:
        self.nodes = dict(capacities)
        known = [c for c in self.nodes.values() if c > 0]
        mean = sum(known) / len(known) if known else 1.0
        points: list[tuple[int, str]] = []
        for node_id, capacity in self.nodes.items():
            weight = capacity / mean if capacity > 0 else 1.0  # unknown capacity: an average node
            count = max(1, round(vnodes * weight))
            prefix = node_id.encode() + b"#"
            points.extend((_point(prefix + str(i).encode()), node_id) for i in range(count))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    def __len__(self) -> int:
        return len(self.nodes)

    @staticmethod
    def key_point(key: bytes) -> int:
        return _point(key)

    def lookup(self, key: bytes, replicas: int = 1) -> list[str]:
        """The nodes holding `key`, primary first (fewer when the ring has fewer nodes)."""
        if not self._hashes:
            return []
        want = min(replicas, len(self.nodes))
        out: list[str] = []
        i = bisect.bisect_right(self._hashes, _point(key))
        n = len(self._hashes)
        for step in range(n):
            owner = self._owners[(i + step) % n]
            if owner not in out:
                out.append(owner)
                if len(out) == want:
                    break
        return out
