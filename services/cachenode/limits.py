"""What a client may send a cache node, and the checks every data plane applies.

One place, so the gRPC service, the chunk assembler and any further data plane reject the
same requests with the same status and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.runtime.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from kvmesh.units import format_size

MAX_NAMESPACE_BYTES = 256


@dataclass(frozen=True)
class Limits:
    """What a client may send."""

    max_key_bytes: int = 1024
    max_value_bytes: int = 256 * 1024**2
    chunk_bytes: int = 4 * 1024**2
    namespaces: frozenset[str] | None = None  # None: every namespace

    def check_namespace(self, namespace: str) -> None:
        if len(namespace.encode()) > MAX_NAMESPACE_BYTES:
            raise InvalidArgument(f"namespace longer than {MAX_NAMESPACE_BYTES} bytes")
        if self.namespaces is not None and namespace not in self.namespaces:
            raise PermissionDenied(f"namespace {namespace!r} is not served by this node")

    def check_key(self, key: bytes) -> None:
        if not key:
            raise InvalidArgument("empty key")
        if len(key) > self.max_key_bytes:
            raise InvalidArgument(f"key of {len(key)} bytes is longer than {self.max_key_bytes}")

    def check_keys(self, keys: Sequence[bytes]) -> None:
        for i, key in enumerate(keys):
            try:
                self.check_key(key)
            except InvalidArgument as exc:
                raise InvalidArgument(f"keys[{i}]: {exc}") from None

    def check_size(self, size: int) -> None:
        if size > self.max_value_bytes:
            raise ResourceExhausted(
                f"value of {format_size(size)} is over --max-value-bytes {format_size(self.max_value_bytes)}"
            )
