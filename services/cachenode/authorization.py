"""Who may touch which namespace on this cache node: the policy's namespace grants, enforced.

Every path that reads or writes blocks (gRPC, the bulk data plane, the zero-copy path) asks
one `NamespaceAuthorizer` with the caller's principal, so the same request gets the same answer
on every plane. Without a policy (`--security-policy` unset) it allows everything, exactly as
before. With one, a call without a principal is UNAUTHENTICATED and a namespace the principal is
not granted is PERMISSION_DENIED; both are raised before anything is read or written.
"""

from __future__ import annotations

from kvmesh.runtime.errors import PermissionDenied, Unauthenticated
from kvmesh.security.identity import Principal
from kvmesh.security.policy import Policy, PolicyFile, allows_namespace, is_admin

EVERY_NAMESPACE = "*"  # the grant that covers every namespace (and so the shared-memory arena)


class NamespaceAuthorizer:
    """The namespace checks of one node; `policy` None turns every check off."""

    def __init__(self, policy: PolicyFile | None = None) -> None:
        self.policy = policy

    @property
    def enforcing(self) -> bool:
        return self.policy is not None

    def current(self) -> Policy | None:
        return self.policy.current() if self.policy is not None else None

    def principal_for_token(self, digest: str) -> Principal | None:
        """The principal a bearer token's SHA-256 names (data plane AUTH frames); None if unknown."""
        policy = self.current()
        if policy is None:
            return None
        name = policy.tokens.get(digest)
        return Principal(name, "token") if name is not None else None

    def authenticated(self, principal: Principal | None) -> None:
        """Raises UNAUTHENTICATED when a policy is in force and the caller proved no identity."""
        if self.policy is not None and principal is None:
            raise Unauthenticated("this node enforces a security policy: present a client certificate or a token")

    def check(self, principal: Principal | None, namespace: str, write: bool) -> None:
        """Raises UNAUTHENTICATED or PERMISSION_DENIED unless `principal` may read (or write) `namespace`."""
        policy = self.current()
        if policy is None:
            return
        self.authenticated(principal)
        decision = allows_namespace(policy, principal, namespace, write)
        if not decision:
            raise PermissionDenied(decision.reason)

    def check_every_namespace(self, principal: Principal | None) -> None:
        """For the zero-copy path: an attached client maps the node's whole arena, so it must be
        admin or be granted both read and write of `*` (every namespace)."""
        policy = self.current()
        if policy is None:
            return
        self.authenticated(principal)
        assert principal is not None
        if is_admin(policy, principal):
            return
        grants = policy.grants(principal)
        reads = any(EVERY_NAMESPACE in g.namespaces.read for g in grants)
        writes = any(EVERY_NAMESPACE in g.namespaces.write for g in grants)
        if not (reads and writes):
            raise PermissionDenied(
                f"{principal.name} may not attach: the zero-copy path maps every namespace's memory, so it "
                "needs admin or namespaces read and write '*'; use the data plane or gRPC instead"
            )
