"""Per-namespace request-rate limits: how often one tenant may call this cache node.

A token bucket per namespace, refilled at the namespace's rate (requests per second) and holding
at most one second's worth, so a tenant may burst to its rate and no further. Every request that
names a namespace costs one token, whatever the plane (a gRPC call, a data-plane frame, a
zero-copy call) and however many keys it carries. A request without a token is refused
RESOURCE_EXHAUSTED before it touches the storage. Buckets of namespaces that went quiet are
dropped once there are many, so clients naming ever new namespaces cannot grow the table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from kvmesh.runtime.errors import ResourceExhausted

MAX_BUCKETS = 10_000


class NamespaceRateLimits:
    """`default` requests per second per namespace, or its override; 0: no limit."""

    def __init__(self, default: float = 0.0, overrides: Mapping[str, float] | None = None) -> None:
        self.default = default
        self.overrides = dict(overrides or {})
        self._buckets: dict[str, tuple[float, float]] = {}  # namespace → (tokens, monotonic time)

    def rate(self, namespace: str) -> float:
        return self.overrides.get(namespace, self.default)

    def admit(self, namespace: str, now: float | None = None) -> None:
        """Takes one token of the namespace's bucket, or raises ResourceExhausted."""
        rate = self.rate(namespace)
        if rate <= 0:
            return
        now = time.monotonic() if now is None else now
        burst = max(1.0, rate)
        tokens, then = self._buckets.get(namespace, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[namespace] = (tokens, now)
            raise ResourceExhausted(
                f"namespace {namespace!r} is over its request rate of {rate:g}/s on this node "
                "(--namespace-rate-limit / --namespace-rate-limits): retry later"
            )
        self._buckets[namespace] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forgets buckets that have refilled (a new bucket starts full: nothing is lost)."""
        for namespace, (tokens, then) in list(self._buckets.items()):
            rate = self.rate(namespace)
            if rate <= 0 or tokens + (now - then) * rate >= max(1.0, rate):
                del self._buckets[namespace]
