"""Checks on client input, done before anything is written (bad input changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.runtime.errors import InvalidArgument, ResourceExhausted
from kvmesh.services.metadata.directory import ROLE_NAMES
from kvmesh.v1 import common_pb2


@dataclass(frozen=True)
class Limits:
    max_id_bytes: int = 253
    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_member_bytes: int = 16 * 1024
    max_labels: int = 64
    max_label_bytes: int = 1024
    max_ttl_seconds: int = 3600
    snapshot_page_bytes: int = 4 * 1024**2


MAX_ADDRESS_BYTES = 261  # a DNS name (253) or [IPv6], a colon and a port


def _printable(text: str) -> bool:
    return text.isprintable() and not any(c.isspace() for c in text)


def check_role(role: int, allow_unspecified: bool) -> None:
    if role in ROLE_NAMES:
        return
    if allow_unspecified and role == common_pb2.ROLE_UNSPECIFIED:
        return
    names = ", ".join(common_pb2.Role.Name(r) for r in ROLE_NAMES)  # type: ignore[arg-type]
    raise InvalidArgument(f"unknown role {role} (expected one of {names})")


def check_member(member: common_pb2.Member, limits: Limits) -> None:
    if not member.id:
        raise InvalidArgument("member id is empty")
    if len(member.id.encode()) > limits.max_id_bytes:
        raise InvalidArgument(f"member id longer than {limits.max_id_bytes} bytes")
    if "/" in member.id or not _printable(member.id):
        raise InvalidArgument(f"member id {member.id!r} has '/', spaces or control characters")
    if member.id in (".", ".."):
        raise InvalidArgument(f"member id {member.id!r} is a path component, not a name")
    check_role(member.role, allow_unspecified=False)
    check_address(member.address)
    if len(member.labels) > limits.max_labels:
        raise InvalidArgument(f"member has {len(member.labels)} labels, more than --max-labels {limits.max_labels}")
    for name, value in member.labels.items():
        if len(name.encode()) + len(value.encode()) > limits.max_label_bytes:
            raise InvalidArgument(f"label {name[:64]!r} is longer than --max-label-bytes {limits.max_label_bytes}")
    if member.ByteSize() > limits.max_member_bytes:
        raise InvalidArgument(
            f"member description of {member.ByteSize()} bytes is over --max-member-bytes {limits.max_member_bytes}"
        )


def check_address(address: str) -> None:
    """host:port with a DNS name, an IPv4 address or a [bracketed] IPv6 address."""
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if (
        not sep
        or not host
        or len(address.encode()) > MAX_ADDRESS_BYTES
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or (":" in host and not bracketed)
        or not _printable(host)
        or any(c in host for c in "/@?#")
    ):
        raise InvalidArgument(f"member address must be host:port (IPv6 as [addr]:port), got {address[:300]!r}")


def check_ttl(ttl_seconds: int, limits: Limits) -> None:
    if not 1 <= ttl_seconds <= limits.max_ttl_seconds:
        raise InvalidArgument(f"ttl_seconds must be in 1..{limits.max_ttl_seconds}, got {ttl_seconds}")


def check_lease(lease_id: int) -> None:
    if lease_id <= 0:
        raise InvalidArgument(f"lease_id must be positive, got {lease_id}")


def check_key(key: str, limits: Limits) -> None:
    if not key:
        raise InvalidArgument("key is empty")
    if len(key.encode()) > limits.max_key_bytes:
        raise InvalidArgument(f"key longer than {limits.max_key_bytes} bytes")
    if not key.isprintable():
        raise InvalidArgument("key has control characters")


def check_prefix(prefix: str, limits: Limits) -> None:
    """A prefix may be empty (everything), otherwise like a key."""
    if prefix:
        check_key(prefix, limits)


def check_value(value: bytes, limits: Limits) -> None:
    if len(value) > limits.max_value_bytes:
        raise ResourceExhausted(f"value of {len(value)} bytes is over the limit of {limits.max_value_bytes}")
