"""What each principal may do: the policy model, its file, and pure decision functions.

A policy file (YAML or JSON; a ConfigMap in Kubernetes) maps principal names — or glob patterns
such as `cachenode-*` — to grants; the grants of every matching entry add up. In member-id and
namespace lists the word `self` stands for the principal's own name, so one entry covers every
cache node ("register only yourself"):

    principals:
      cachenode-*:
        register: {roles: [cachenode], members: [self], max_capacity_bytes: 64GiB}
      engine-*:
        register: {roles: [engine], members: [self]}
        events: [self]                       # whose KV events it may report
        route: true
        namespaces: {read: [shared], write: [shared]}
      tenant-a:
        tokens_sha256: [<sha256 hex of the token>]   # bearer tokens, stored hashed
        namespaces: {read: [tenant-a], write: [tenant-a]}
        metadata: {read: [config/], write: [config/tenant-a/]}   # key prefixes
      ops:
        admin: true                          # everything, reflection included

Nothing is allowed that the policy does not grant. The functions below are pure: the caller
passes the policy, the principal and the request's facts, and gets a `Decision` with a reason.
`PolicyFile` re-reads the file when it changes; a file that no longer parses is logged and the
previous policy stays in force.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvmesh.security.identity import Principal
from kvmesh.units import parse_size

log = logging.getLogger("kvmesh.security.policy")

Role = Literal["cachenode", "router", "engine"]
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class Access(BaseModel):
    """Read and write lists (namespaces, or metadata key prefixes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()


class Registration(BaseModel):
    """Which members a principal may register (and renew, update, deregister)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    roles: tuple[Role, ...] = ()
    members: tuple[str, ...] = ("self",)
    max_capacity_bytes: int | None = Field(None, ge=0)

    @field_validator("max_capacity_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value


class Grant(BaseModel):
    """What the principals matching one policy entry may do (`register:` in the file)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    tokens_sha256: tuple[str, ...] = ()
    registration: Registration | None = Field(None, alias="register")
    events: tuple[str, ...] = ()
    namespaces: Access = Access()
    metadata: Access = Access()
    route: bool = False
    admin: bool = False

    @field_validator("tokens_sha256")
    @classmethod
    def _digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for digest in value:
            if not _DIGEST.match(digest):
                raise ValueError("tokens_sha256 holds SHA-256 hex digests (64 lowercase hex digits), never tokens")
        return value


class Policy(BaseModel):
    """The whole policy: principal name or glob → grant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    principals: dict[str, Grant] = Field(default_factory=dict)

    @field_validator("principals")
    @classmethod
    def _unique_tokens(cls, value: dict[str, Grant]) -> dict[str, Grant]:
        seen: dict[str, str] = {}
        for name, grant in value.items():
            for digest in grant.tokens_sha256:
                if digest in seen:
                    raise ValueError(f"one token digest given to both {seen[digest]!r} and {name!r}")
                if any(ch in name for ch in "*?["):
                    raise ValueError(f"tokens belong to one principal, not a pattern: {name!r}")
                seen[digest] = name
        return value

    @property
    def tokens(self) -> dict[str, str]:
        """Token digest → principal name."""
        return {d: name for name, grant in self.principals.items() for d in grant.tokens_sha256}

    def grants(self, principal: Principal | None) -> list[Grant]:
        """The grants of every entry matching the principal's name."""
        if principal is None:
            return []
        return [g for pattern, g in self.principals.items() if fnmatch.fnmatchcase(principal.name, pattern)]


class Decision(NamedTuple):
    """An answer and why (the reason goes into the PERMISSION_DENIED message and the log)."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def _matches(patterns: Iterable[str], value: str, principal: Principal) -> bool:
    for pattern in patterns:
        pattern = principal.name if pattern == "self" else pattern
        if fnmatch.fnmatchcase(value, pattern):
            return True
    return False


def _unauthenticated() -> Decision:
    return Decision(False, "no authenticated principal")


def is_admin(policy: Policy, principal: Principal | None) -> Decision:
    if principal is None:
        return _unauthenticated()
    if any(g.admin for g in policy.grants(principal)):
        return Decision(True, f"{principal.name} is admin")
    return Decision(False, f"{principal.name} is not admin")


def allows_register(policy: Policy, principal: Principal | None, member_id: str, role: str,
                    capacity_bytes: int = 0) -> Decision:
    """May `principal` register (renew, update, deregister) member `member_id` as `role` with
    `capacity_bytes`? The capacity bound is the largest among the grants that allow the id and role."""
    if principal is None:
        return _unauthenticated()
    if is_admin(policy, principal):
        return Decision(True, f"{principal.name} is admin")
    fitting = [g.registration for g in policy.grants(principal)
               if g.registration is not None and role in g.registration.roles
               and _matches(g.registration.members, member_id, principal)]
    if not fitting:
        return Decision(False, f"{principal.name} may not register {member_id!r} as {role}")
    bounds = [r.max_capacity_bytes for r in fitting]
    bound = None if any(b is None for b in bounds) else max(b for b in bounds if b is not None)
    if bound is not None and capacity_bytes > bound:
        return Decision(False, f"{principal.name} may register at most {bound} bytes of capacity, "
                               f"not {capacity_bytes}")
    return Decision(True, f"{principal.name} may register {member_id!r} as {role}")


def allows_namespace(policy: Policy, principal: Principal | None, namespace: str, write: bool) -> Decision:
    """May `principal` read (get, exists) or write (put, delete) blocks of `namespace` on cache nodes?"""
    if principal is None:
        return _unauthenticated()
    if is_admin(policy, principal):
        return Decision(True, f"{principal.name} is admin")
    verb = "write" if write else "read"
    for g in policy.grants(principal):
        if _matches(g.namespaces.write if write else g.namespaces.read, namespace, principal):
            return Decision(True, f"{principal.name} may {verb} namespace {namespace!r}")
    return Decision(False, f"{principal.name} may not {verb} namespace {namespace!r}")


def allows_events(policy: Policy, principal: Principal | None, member_id: str) -> Decision:
    """May `principal` report KV-cache events on behalf of pod `member_id`?"""
    if principal is None:
        return _unauthenticated()
    if is_admin(policy, principal):
        return Decision(True, f"{principal.name} is admin")
    if any(_matches(g.events, member_id, principal) for g in policy.grants(principal)):
        return Decision(True, f"{principal.name} may report events of {member_id!r}")
    return Decision(False, f"{principal.name} may not report events of {member_id!r}")


def allows_metadata(policy: Policy, principal: Principal | None, key: str, write: bool) -> Decision:
    """May `principal` read or write metadata key `key`? Grants name key prefixes (`self` = its name)."""
    if principal is None:
        return _unauthenticated()
    if is_admin(policy, principal):
        return Decision(True, f"{principal.name} is admin")
    verb = "write" if write else "read"
    for g in policy.grants(principal):
        for prefix in g.metadata.write if write else g.metadata.read:
            prefix = principal.name if prefix == "self" else prefix
            if key.startswith(prefix):
                return Decision(True, f"{principal.name} may {verb} metadata under {prefix!r}")
    return Decision(False, f"{principal.name} may not {verb} metadata key {key!r}")


def allows_route(policy: Policy, principal: Principal | None) -> Decision:
    """May `principal` ask the router where requests go (and release its own)?"""
    if principal is None:
        return _unauthenticated()
    if any(g.route or g.admin for g in policy.grants(principal)):
        return Decision(True, f"{principal.name} may route")
    return Decision(False, f"{principal.name} may not route")


# -- the file -------------------------------------------------------------------------------


class PolicyError(ValueError):
    """A policy file that does not parse or validate."""


def parse_policy(text: str, source: str = "policy") -> Policy:
    """A policy from YAML or JSON text (JSON is YAML; JSON is tried first, needing no YAML parser)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: not YAML or JSON: {exc}") from None
    if data is None:
        data = {}
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{source}: {exc}") from None


class PolicyFile:
    """A policy file, re-read when its size, mtime or inode changes (checked at most every
    `check_seconds`). A bad file at start-up is an error; a bad file later keeps the previous policy."""

    def __init__(self, path: Path, check_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.check_seconds = check_seconds
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._policy = parse_policy(self.path.read_text(), str(self.path))
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked < self.check_seconds:
            return self._policy
        with self._lock:
            self._checked = now
            try:
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp  # a bad file is reported once, then again when it changes
                    self._policy = parse_policy(self.path.read_text(), str(self.path))
                    log.info("policy reloaded", extra={"path": str(self.path)})
            except (OSError, PolicyError) as exc:
                log.error("policy file not reloaded, the previous policy stays in force: %s", exc)
            return self._policy
