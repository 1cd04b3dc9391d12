"""The one gate every plane of the cache node passes before touching a namespace.

A namespace is a tenant boundary: a principal reads or writes only the namespaces the policy
grants it (authorization.py), each namespace has its own request rate (rate_limits.py) and byte
quota (quotas.py). gRPC, the bulk data plane and the zero-copy path all ask this gate with the
caller's principal, in the same order — permission, then rate, then quota — so a refused request
costs the tenant nothing and changes nothing, and the same request gets the same answer on
every plane.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.security.identity import Principal
from kvmesh.services.cachenode.authorization import NamespaceAuthorizer
from kvmesh.services.cachenode.quotas import NamespaceQuotas
from kvmesh.services.cachenode.rate_limits import NamespaceRateLimits


class TenantGate:
    """Permissions, rates and quotas per namespace; the defaults allow everything, count nothing."""

    def __init__(
        self,
        authorizer: NamespaceAuthorizer | None = None,
        quotas: NamespaceQuotas | None = None,
        rates: NamespaceRateLimits | None = None,
    ) -> None:
        self.authorizer = authorizer or NamespaceAuthorizer()
        self.quotas = quotas or NamespaceQuotas()
        self.rates = rates or NamespaceRateLimits()

    @property
    def enforcing(self) -> bool:
        """A policy is in force (callers must be authenticated)."""
        return self.authorizer.enforcing

    def read(self, principal: Principal | None, namespace: str) -> None:
        """A read (get, exists) of `namespace`: raises unless allowed and within the rate."""
        self.authorizer.check(principal, namespace, write=False)
        self.rates.admit(namespace)

    def delete(self, principal: Principal | None, namespace: str) -> None:
        """A delete in `namespace` (a write permission; frees quota once done: `deleted`)."""
        self.authorizer.check(principal, namespace, write=True)
        self.rates.admit(namespace)

    def write(self, principal: Principal | None, namespace: str, items: Sequence[tuple[bytes, int]],
              count_request: bool = True) -> None:
        """Writes of (key, size) into `namespace`: permission, rate, then the quota is charged.

        `count_request` False for the second and later values of one request (a stream)."""
        self.authorizer.check(principal, namespace, write=True)
        if count_request:
            self.rates.admit(namespace)
        self.quotas.charge(namespace, items)

    async def write_async(self, principal: Principal | None, namespace: str, items: Sequence[tuple[bytes, int]],
                          count_request: bool = True) -> None:
        """`write`, but the quota is reconciled with the storage before a write is refused."""
        self.authorizer.check(principal, namespace, write=True)
        if count_request:
            self.rates.admit(namespace)
        await self.quotas.charge_or_reconcile(namespace, items)

    def deleted(self, namespace: str, key: bytes) -> None:
        """A key was deleted: its bytes leave the quota."""
        self.quotas.refund(namespace, key)

    async def close(self) -> None:
        await self.quotas.close()
