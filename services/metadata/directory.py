"""Membership as a layer over any `Store`: members are keys bound to their lease.

A member lives at `members/<role>/<id>` (its serialized `Member`), bound to its lease, so
lease expiry or revocation deletes it in the backend itself and every replica sees the
same LEAVE. `leases/<lease_id>` (bound to the same lease) maps a lease back to its member
key, so any replica can serve a KeepAlive for a lease granted through another one: nothing
needed to serve a member is kept only in one replica's memory. With a security policy it also
names the lease's owner (the principal that registered it: `<member key>\n<owner>`), so every
replica, on every backend, enforces the same ownership.

Events map from store changes: a put of a new key is JOIN, an overwrite is UPDATE (load
changes, and a Register that replaces a member with the same id), a delete is LEAVE.

No answer outgrows a message: List returns pages of at most `page_bytes` of members with a
token for the next one, and a Watch SNAPSHOT larger than that goes out as several SNAPSHOT
messages of one revision, `more` set on all but the last.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence

from google.protobuf.message import DecodeError

from kvmesh.runtime.errors import InvalidArgument, PermissionDenied, Unavailable
from kvmesh.services.metadata.stores.base import Change, Compacted, Entry, LeaseNotFound, Store, StoreHandle
from kvmesh.v1 import common_pb2, metadata_pb2

MEMBERS = "members/"
LEASES = "leases/"

ROLE_NAMES: dict[int, str] = {
    common_pb2.ROLE_ENGINE: "engine",
    common_pb2.ROLE_CACHENODE: "cachenode",
    common_pb2.ROLE_ROUTER: "router",
}
ROLES_BY_NAME = {name: role for role, name in ROLE_NAMES.items()}


def role_prefix(role: int) -> str:
    """Where members of `role` live (ROLE_UNSPECIFIED: all roles)."""
    return MEMBERS if role == common_pb2.ROLE_UNSPECIFIED else f"{MEMBERS}{ROLE_NAMES[role]}/"


def member_key(member: common_pb2.Member) -> str:
    return f"{role_prefix(member.role)}{member.id}"


def lease_key(lease_id: int) -> str:
    return f"{LEASES}{lease_id}"


def lease_index(member_key: str, owner: str) -> bytes:
    """The value of `leases/<id>`: the member key, then the owner's name when there is one."""
    return (f"{member_key}\n{owner}" if owner else member_key).encode()


def parse_lease_index(value: bytes) -> tuple[str, str]:
    """(member key, owner) of a `leases/<id>` value; owner "" for a lease registered without a
    policy (member keys never hold a newline: ids are printable without spaces)."""
    member_key, _, owner = value.decode(errors="replace").partition("\n")
    return member_key, owner


def decode_member(key: str, value: bytes) -> common_pb2.Member:
    """The stored member; for a value we cannot read, at least its id and role from the key."""
    member = common_pb2.Member()
    with contextlib.suppress(DecodeError):
        member.ParseFromString(value)
    if not member.id:
        _, role_name, member_id = key.split("/", 2)
        member.id = member_id
        member.role = ROLES_BY_NAME.get(role_name, common_pb2.ROLE_UNSPECIFIED)  # type: ignore[assignment]
    return member


def event_for(change: Change) -> metadata_pb2.MembershipEvent:
    if change.kind == "delete":
        kind = metadata_pb2.LEAVE
    else:
        kind = metadata_pb2.JOIN if change.created else metadata_pb2.UPDATE
    return metadata_pb2.MembershipEvent(
        type=kind, members=[decode_member(change.key, change.value)], revision=change.revision
    )


class MemberDirectory:
    """Register / renew / leave / list / watch, identical on every backend."""

    # How often Register retries its compare-and-swap when another registration races it.
    CAS_ATTEMPTS = 8

    def __init__(self, handle: StoreHandle, page_bytes: int = 4 * 1024**2) -> None:
        self._handle = handle
        self._page_bytes = page_bytes

    @property
    def store(self) -> Store:
        return self._handle.store

    async def register(self, member: common_pb2.Member, ttl_seconds: int, owner: str = "",
                       may_replace: Callable[[str], bool] | None = None) -> tuple[int, int, int]:
        """Creates or replaces the member under a new lease: (lease_id, ttl, revision).

        A member with the same role and id is overwritten (watchers see UPDATE) and its old
        lease is revoked, with whatever else was bound to it. `owner` is stored with the new
        lease; `may_replace(owner of the live member)` says whether the caller may take over a
        live member (PERMISSION_DENIED otherwise, nothing changed); a member whose lease has
        ended may be replaced by anyone allowed to register it. The check and the swap are
        one compare-and-swap: a member re-registered in between is checked again.
        """
        key = member_key(member)
        if may_replace is not None:  # a refused take-over must not even grant a lease
            await self._check_replace(member, await self.store.get(key), may_replace)
        lease_id, ttl = await self.store.grant(ttl_seconds)
        try:
            await self.store.put(lease_key(lease_id), lease_index(key, owner), lease_id)
            value = member.SerializeToString()
            # Expect a new member first (one round trip); a failed swap returns what is there.
            replaced: Entry | None = None
            for _ in range(self.CAS_ATTEMPTS):
                if replaced is not None and may_replace is not None:
                    await self._check_replace(member, replaced, may_replace)
                expected = replaced.mod_revision if replaced else 0
                ok, revision, current = await self.store.compare_and_swap(key, expected, value, lease_id)
                if ok:
                    break
                replaced = current
            else:
                raise Unavailable(f"member {member.id!r} is being registered concurrently; retry")
            if replaced is not None and replaced.lease_id and replaced.lease_id != lease_id:
                with contextlib.suppress(LeaseNotFound):
                    await self.store.revoke(replaced.lease_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.revoke(lease_id)
            raise
        return lease_id, ttl, revision

    async def _check_replace(self, member: common_pb2.Member, live: Entry | None,
                             may_replace: Callable[[str], bool]) -> None:
        """PERMISSION_DENIED when `live` (the stored member) belongs to a lease the caller may not take over."""
        if live is None or not live.lease_id:
            return
        owner = await self.owner_of(live.lease_id)  # None: its lease has just ended
        if owner is not None and not may_replace(owner):
            raise PermissionDenied(f"member {member.id!r} is registered by another principal")

    async def refresh(self, lease_id: int) -> int:
        return await self.store.refresh(lease_id)

    async def deregister(self, lease_id: int) -> int:
        return await self.store.revoke(lease_id)

    async def owner_of(self, lease_id: int) -> str | None:
        """The principal that registered `lease_id` ("" without a policy); None for an unknown lease."""
        index = await self.store.get(lease_key(lease_id))
        return None if index is None else parse_lease_index(index.value)[1]

    async def member_of(self, lease_id: int) -> tuple[Entry, str]:
        """The member entry bound to `lease_id` and the lease's owner; LeaseNotFound when there is none."""
        index = await self.store.get(lease_key(lease_id))
        if index is None:
            raise LeaseNotFound(lease_id)
        key, owner = parse_lease_index(index.value)
        entry = await self.store.get(key)
        if entry is None or entry.lease_id != lease_id:
            raise LeaseNotFound(lease_id)
        return entry, owner

    async def update_load(self, lease_id: int, entry: Entry | None, load: common_pb2.Load) -> Entry:
        """Writes a new load into the member (one UPDATE event); returns the entry written."""
        for _ in range(2):
            if entry is None:
                entry, _ = await self.member_of(lease_id)
            member = decode_member(entry.key, entry.value)
            member.load.CopyFrom(load)
            value = member.SerializeToString()
            ok, _, current = await self.store.compare_and_swap(entry.key, entry.mod_revision, value, lease_id)
            if ok and current is not None:
                return current
            entry = None  # changed under us (a re-register): read it again
        raise LeaseNotFound(lease_id)

    async def list(self, role: int, page_token: str = "") -> tuple[list[common_pb2.Member], int, str]:
        """One page of members after `page_token` (a member key), the revision, and the next token."""
        prefix = role_prefix(role)
        if page_token and not page_token.startswith(prefix):
            raise InvalidArgument("page_token does not belong to this role's listing")
        entries, revision = await self.store.range(prefix)
        members = [decode_member(e.key, e.value) for e in entries if e.key > page_token]
        keys = [e.key for e in entries if e.key > page_token]
        page = next(self._pages(members))
        next_token = keys[len(page) - 1] if len(page) < len(members) else ""
        return page, revision, next_token

    def _pages(self, members: Sequence[common_pb2.Member]) -> Iterator[builtins.list[common_pb2.Member]]:
        """`members` cut into pages of at most `page_bytes` (at least one member each); always one page."""
        page: builtins.list[common_pb2.Member] = []
        size = 0
        for member in members:
            grow = member.ByteSize() + 8
            if page and size + grow > self._page_bytes:
                yield page
                page, size = [], 0
            page.append(member)
            size += grow
        yield page

    def snapshot(self, entries: Sequence[Entry], revision: int) -> Iterator[metadata_pb2.MembershipEvent]:
        """SNAPSHOT messages of one revision, `more` on all but the last."""
        pages = list(self._pages([decode_member(e.key, e.value) for e in entries]))
        for i, page in enumerate(pages):
            yield metadata_pb2.MembershipEvent(
                type=metadata_pb2.SNAPSHOT, members=page, revision=revision, more=i < len(pages) - 1
            )

    async def watch(self, role: int, start_revision: int) -> AsyncGenerator[metadata_pb2.MembershipEvent, None]:
        """A replay after `start_revision` when retained, otherwise a SNAPSHOT; then live events."""
        prefix = role_prefix(role)
        if start_revision > 0:
            try:
                async with contextlib.aclosing(self.store.watch(prefix, start_revision)) as changes:
                    async for change in changes:
                        yield event_for(change)
                return
            except Compacted:
                pass  # raised before any event: answer with a snapshot instead
        while True:
            entries, revision = await self.store.range(prefix)
            for page in self.snapshot(entries, revision):
                yield page
            try:
                async with contextlib.aclosing(self.store.watch(prefix, revision)) as changes:
                    async for change in changes:
                        yield event_for(change)
                return
            except Compacted:
                continue  # compacted between the range and the watch: take a new snapshot
