"""Who may do what on the metadata service, asked of the policy (`--security-policy`).

The servicers ask one `Authorizer`; it reads the caller (`current_principal()`, set by the
authenticating interceptor) and the current policy, and answers with the pure decisions of
`kvmesh.security.policy`. Without a policy every answer is yes and nobody owns anything, so a
service without `--security-policy` behaves exactly as before.

Ownership: the principal that registers a member owns its lease (the directory stores the
owner's name with the lease, in the backend, so every replica sees it). Only the owner, or an
admin, may renew, update, deregister, take over or bind keys to it. A lease that is someone
else's is answered exactly like an unknown one, so lease ids cannot be probed.
"""

from __future__ import annotations

from pathlib import Path

from kvmesh.runtime.errors import PermissionDenied, Unauthenticated
from kvmesh.security.identity import Principal, current_principal
from kvmesh.security.policy import Decision, PolicyFile, allows_metadata, allows_register, is_admin
from kvmesh.services.metadata.directory import ROLE_NAMES
from kvmesh.v1 import common_pb2


def _enforce(decision: Decision, principal: Principal | None) -> None:
    if decision:
        return
    if principal is None:
        raise Unauthenticated(decision.reason)
    raise PermissionDenied(decision.reason)


class Authorizer:
    """The metadata service's permission checks; all of them pass when no policy is set."""

    def __init__(self, policy: PolicyFile | None = None) -> None:
        self._policy = policy

    @classmethod
    def from_file(cls, path: Path | None) -> Authorizer:
        """The authorizer of `--security-policy` (a bad file at start-up raises PolicyError)."""
        return cls(PolicyFile(path) if path is not None else None)

    @property
    def enabled(self) -> bool:
        return self._policy is not None

    def owner(self) -> str:
        """The name stored as owner of what the caller creates ("" without a policy: no owner)."""
        principal = current_principal()
        return principal.name if self._policy is not None and principal is not None else ""

    def may_act_on(self, owner: str | None) -> bool:
        """May the caller renew, update, end or take over what `owner` registered?

        `owner` None is an unknown lease; "" one registered without a policy, which only admins
        may touch (it expires on its TTL and its member registers again)."""
        if self._policy is None:
            return owner is not None
        if owner is None:
            return False
        principal = current_principal()
        if principal is None:
            return False
        return owner == principal.name or bool(is_admin(self._policy.current(), principal))

    def check_register(self, member: common_pb2.Member) -> None:
        """PERMISSION_DENIED unless the caller may register this id, role and capacity."""
        if self._policy is None:
            return
        principal = current_principal()
        decision = allows_register(self._policy.current(), principal, member.id, ROLE_NAMES[member.role],
                                   member.capacity_bytes)
        _enforce(decision, principal)

    def check_key(self, key: str, write: bool) -> None:
        """PERMISSION_DENIED unless the caller may read (or write) metadata key `key`."""
        if self._policy is None:
            return
        principal = current_principal()
        _enforce(allows_metadata(self._policy.current(), principal, key, write), principal)

    def readable(self, key: str) -> bool:
        """Whether the caller may read `key` (Range and Watch leave out the others)."""
        if self._policy is None:
            return True
        return bool(allows_metadata(self._policy.current(), current_principal(), key, write=False))
