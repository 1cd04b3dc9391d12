"""Who may do what on the router: the security policy's decisions applied to its calls.

The authenticating interceptor has already named the caller (`current_principal()`); this says
whether that caller may route (`allows_route`: `Route`, `RouteStream`, `Release`, the Envoy
picker) and whose KV events it may report (`allows_events`). Each routed request belongs to
the principal that routed it (its *owner*): only the owner, or an admin, releases it.

Without `--security-policy` every check passes and every request has the owner "", exactly as
before security existed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kvmesh.runtime.errors import PermissionDenied, Unauthenticated
from kvmesh.security.identity import Principal, current_principal
from kvmesh.security.policy import Decision, Policy, PolicyFile, allows_events, allows_route, is_admin

log = logging.getLogger("kvmesh.router.access")

_MAX_CACHED = 4096  # principals whose route decision is remembered (per policy version)


class RouterAccess:
    """The router's authorization: one per service, over the same policy file the interceptor reads."""

    def __init__(self, policy_path: Path | None) -> None:
        self._file = PolicyFile(policy_path) if policy_path is not None else None
        # `Route` is the hot path: its decision depends only on the policy and the principal's
        # name, so it is remembered per name until the policy file is reloaded.
        self._cached_for: Policy | None = None
        self._route_decisions: dict[str, Decision] = {}

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def _caller(self) -> Principal:
        principal = current_principal()
        if principal is None:  # the interceptor lets no such call through; never guess
            raise Unauthenticated("this call needs credentials: a client certificate or a bearer token")
        return principal

    def route_owner(self) -> str:
        """The owner of the requests this caller routes (its name); PermissionDenied when it may
        not route. "" without a policy."""
        if self._file is None:
            return ""
        principal = self._caller()
        policy = self._file.current()
        if policy is not self._cached_for:
            self._cached_for, self._route_decisions = policy, {}
        decision = self._route_decisions.get(principal.name)
        if decision is None:
            decision = allows_route(policy, principal)
            if len(self._route_decisions) >= _MAX_CACHED:
                self._route_decisions.clear()
            self._route_decisions[principal.name] = decision
        if not decision:
            raise PermissionDenied(decision.reason)
        return principal.name

    def is_admin(self) -> bool:
        """The caller is an admin (it may release any request). False without a policy."""
        if self._file is None:
            return False
        return bool(is_admin(self._file.current(), current_principal()))

    def check_events(self, member_id: str) -> None:
        """PermissionDenied unless the caller may report KV events of pod `member_id`."""
        if self._file is None:
            return
        principal = self._caller()
        decision = allows_events(self._file.current(), principal, member_id)
        if not decision:
            log.warning("refused KV events: %s", decision.reason, extra={"principal": principal.name})
            raise PermissionDenied(decision.reason)
