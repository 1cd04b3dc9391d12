"""Frames of the local control socket: the zero-copy path's Allocate/Seal/Acquire/ReleaseViews
between a client and a cache node on the same host, without gRPC's per-call cost.

A grpc.aio unary call costs ~0.3-0.7 ms of CPU on a small host, more than copying a 1 MiB
block; these four messages are tiny, so on the same host they travel over a Unix socket.
Each frame is a 5-byte header, little-endian `u32 payload length`, `u8 kind`, then the
payload. The client opens with HELLO (payload: the session id from its Attach stream, UTF-8);
the node answers OK (empty) or ERROR and closes. Then every request is the gRPC request
message of its kind (protobuf bytes, the same fields, `session_id` included), answered in
order by OK + the gRPC response message, or by ERROR: `u8 grpc status code`, UTF-8 details.
A frame longer than `MAX_FRAME` is refused with ERROR and the connection closed.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<IB")
MAX_FRAME = 16 * 1024 * 1024

# Client → node.
HELLO = 1
ALLOCATE = 2
SEAL = 3
ACQUIRE = 4
RELEASE = 5
REQUEST_KINDS = frozenset({ALLOCATE, SEAL, ACQUIRE, RELEASE})

# Node → client.
OK = 0
ERROR = 255


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def error_frame(code: int, details: str) -> bytes:
    return frame(ERROR, bytes([code & 0xFF]) + details.encode("utf-8", "replace")[:4096])


def parse_error(payload: bytes) -> tuple[int, str]:
    """(grpc status code number, details) of an ERROR payload."""
    if not payload:
        return 2, "empty error frame"  # UNKNOWN
    return payload[0], payload[1:].decode("utf-8", "replace")
