"""The cache node's storage tier list (`--storage 'L1,L2'`), parsed the same way everywhere.

The cache node builds its storage from it and the operator validates a pool's spec with it,
so both accept exactly the same lists. The scheme names live here, in the foundation, so
that the operator can check them without importing the cache node; the cache node's
registry checks at import that it registers exactly these.
"""

from __future__ import annotations

import re

STORAGE_SCHEMES = frozenset({"memory", "disk", "redis", "rediss", "redis+cluster", "vineyard", "gpu", "rdma"})

# A comma starts a new tier only where a scheme follows: `redis+cluster://h1:7000,h2:7001` is one tier.
_TIER_BOUNDARY = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_tiers(spec: str) -> list[str]:
    """'L1,L2' → ['L1', 'L2']; a comma inside one URI (a redis+cluster host list) does not split."""
    return [part.strip() for part in _TIER_BOUNDARY.split(spec) if part.strip()]
