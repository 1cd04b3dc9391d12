"""Frames of the bulk data plane: a binary, length-prefixed protocol beside gRPC.

Every frame is a fixed 32-byte header, then `meta_len` bytes of metadata (namespace and
keys, or per-key results), then `payload_len` bytes of values laid end to end. Values are
never inside the metadata, so a receiver reads them straight into their final memory and a
sender writes them straight from theirs. All integers are little-endian. docs/dataplane.md
specifies the format for other languages; this module is its one Python codec (the cache
node's server and the client library both use it).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple

MAGIC = b"KD"
VERSION = 1
# magic, version, op, request_id, status, flags, count, meta_len, payload_len, 4 reserved bytes
HEADER = struct.Struct("<2sBBIHHIIQ4x")
HEADER_BYTES = HEADER.size  # 32
MISSING = 2**64 - 1  # a GET response's length of a key that is not stored

_NAMESPACE = struct.Struct("<H")
_TTL = struct.Struct("<I")
_PUT_KEY = struct.Struct("<HQ")  # key length, value length
_KEY = struct.Struct("<H")
_LENGTH = struct.Struct("<Q")

MAX_NAMESPACE_BYTES = 65535
MAX_KEY_BYTES = 65535
MAX_TOKEN_BYTES = 4096  # an AUTH frame's metadata


class Op(enum.IntEnum):
    """What a request asks; its response carries the same op."""

    PUT = 1
    GET = 2
    EXISTS = 3
    DELETE = 4
    AUTH = 5  # a bearer token, sent once at connection start (docs/dataplane.md)


class Flag(enum.IntFlag):
    """Header flag bits."""

    NONE = 0
    RESPONSE = 1  # set on every frame the node sends
    STOP_AT_FIRST_MISS = 2  # GET: answer keys up to the first absent one


class Status(enum.IntEnum):
    """Status codes: the gRPC numbering, so both planes report errors alike."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class FrameError(ValueError):
    """A frame that breaks the format: the connection cannot be trusted past it."""


class Header(NamedTuple):
    op: int
    request_id: int
    status: int
    flags: int
    entries: int  # keys of a request, answers of a response
    meta_len: int
    payload_len: int


class Request(NamedTuple):
    """A request's decoded metadata (`sizes` only for PUT)."""

    namespace: str
    ttl_seconds: int
    keys: list[bytes]
    sizes: list[int]


def encode_header(
    op: int, request_id: int, count: int, meta_len: int, payload_len: int, status: int = 0, flags: int = 0
) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, request_id, status, flags, count, meta_len, payload_len)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parses the 32 header bytes; raises FrameError on a wrong magic or version."""
    magic, version, op, request_id, status, flags, count, meta_len, payload_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"unsupported version {version} (this side speaks {VERSION})")
    return Header(op, request_id, status, flags, count, meta_len, payload_len)


# -- requests --------------------------------------------------------------------------


def request_meta_bound(count: int, namespace_max: int, key_max: int, with_sizes: bool) -> int:
    """The largest metadata a well-formed request of `count` keys can carry (a receiver's cap)."""
    per_key = (_PUT_KEY.size if with_sizes else _KEY.size) + key_max
    return _NAMESPACE.size + namespace_max + _TTL.size + count * per_key


def encode_request(
    op: Op,
    request_id: int,
    namespace: str,
    keys: Sequence[bytes],
    sizes: Sequence[int] | None = None,
    ttl_seconds: int = 0,
    flags: int = 0,
) -> bytes:
    """Header and metadata of a request (a PUT's values follow them, in key order)."""
    ns = namespace.encode()
    if len(ns) > MAX_NAMESPACE_BYTES:
        raise ValueError("namespace too long for a frame")
    parts = [_NAMESPACE.pack(len(ns)), ns, _TTL.pack(ttl_seconds)]
    payload = 0
    if op == Op.PUT:
        if sizes is None or len(sizes) != len(keys):
            raise ValueError("a PUT needs one size per key")
        for key, size in zip(keys, sizes, strict=True):
            parts.append(_PUT_KEY.pack(len(key), size))
            parts.append(key)
            payload += size
    else:
        for key in keys:
            parts.append(_KEY.pack(len(key)))
            parts.append(key)
    meta = b"".join(parts)
    return encode_header(op, request_id, len(keys), len(meta), payload, flags=flags) + meta


def decode_request(op: int, count: int, meta: bytes | bytearray | memoryview) -> Request:
    """Parses a request's metadata; raises FrameError unless it is exactly `count` entries."""
    end = len(meta)
    try:
        (ns_len,) = _NAMESPACE.unpack_from(meta, 0)
        pos = _NAMESPACE.size + ns_len
        if pos > end:
            raise FrameError("request metadata ends inside the namespace")
        namespace = bytes(meta[_NAMESPACE.size : pos]).decode()
        (ttl,) = _TTL.unpack_from(meta, pos)
        pos += _TTL.size
        keys: list[bytes] = []
        sizes: list[int] = []
        put = op == Op.PUT
        entry = _PUT_KEY if put else _KEY
        for _ in range(count):
            fields = entry.unpack_from(meta, pos)
            pos += entry.size
            key_len = fields[0]
            if pos + key_len > end:
                raise FrameError("request metadata ends inside a key")
            keys.append(bytes(meta[pos : pos + key_len]))
            pos += key_len
            if put:
                sizes.append(fields[1])
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed request metadata: {exc}") from None
    if pos != end:
        raise FrameError(f"request metadata is {end} bytes but its {count} entries take {pos}")
    return Request(namespace, ttl, keys, sizes)


def encode_auth(request_id: int, token: str) -> bytes:
    """An AUTH request: the token as UTF-8 metadata, no entries, no payload."""
    data = token.encode()
    if not data or len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"a token is 1..{MAX_TOKEN_BYTES} bytes")
    return encode_header(Op.AUTH, request_id, 0, len(data), 0) + data


# -- responses -------------------------------------------------------------------------


def encode_codes(op: Op, request_id: int, codes: Sequence[int] | bytes) -> bytes:
    """A PUT (per-key status), EXISTS (1 present) or DELETE (1 deleted) response: one byte per key."""
    meta = bytes(codes)
    return encode_header(op, request_id, len(meta), len(meta), 0, flags=Flag.RESPONSE) + meta


def encode_lengths(request_id: int, lengths: Sequence[int]) -> bytes:
    """A GET response's header and metadata: each answered key's value length, or MISSING."""
    meta = struct.pack(f"<{len(lengths)}Q", *lengths)
    payload = sum(n for n in lengths if n != MISSING)
    return encode_header(Op.GET, request_id, len(lengths), len(meta), payload, flags=Flag.RESPONSE) + meta


def decode_lengths(count: int, meta: bytes | bytearray | memoryview) -> tuple[int, ...]:
    if len(meta) != count * _LENGTH.size:
        raise FrameError(f"GET response metadata is {len(meta)} bytes for {count} keys")
    return struct.unpack_from(f"<{count}Q", meta)


def encode_error(op: int, request_id: int, status: int, message: str) -> bytes:
    """An error response: a non-zero status, the message as UTF-8 metadata, no payload."""
    text = message.encode()[:4096]
    return encode_header(op, request_id, 0, len(text), 0, status=status, flags=Flag.RESPONSE) + text
