"""Hand-encoded `PutChunk` and `GetChunk` messages for the bulk data path, with fewer copies.

Python protobuf copies a `bytes` field when the message is built, again when it is
serialized, and again (twice) when it is parsed and read. For multi-megabyte KV blocks
those copies cost more than the rest of the call, so the two streaming RPCs that carry
values encode and decode these messages by hand: encoding joins a small header with the
value (one copy), decoding returns a memoryview into the received buffer (no copy).

The bytes on the wire are ordinary protobuf, identical to what the generated classes
produce and accept, so clients and servers using the generated stubs interoperate.
"""

from __future__ import annotations

from dataclasses import dataclass

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _field_len(number: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    return [_varint(number << 3 | _LEN), _varint(len(data)), data]


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3 | _VARINT) + _varint(value) if value else b""


def _fields(raw: bytes | memoryview) -> dict[int, int | memoryview]:
    """Field number → last value (varints as int, length-delimited as views); others skipped."""
    buf = memoryview(raw)
    out: dict[int, int | memoryview] = {}
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        number, kind = tag >> 3, tag & 7
        if kind == _VARINT:
            value, pos = _read_varint(buf, pos)
            out[number] = value
        elif kind == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            out[number] = buf[pos : pos + size]
            pos += size
        elif kind == _I64:
            pos += 8
        elif kind == _I32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {kind}")
        if pos > end:
            raise ValueError("truncated field")
    return out


def _bytes(fields: dict[int, int | memoryview], number: int) -> memoryview:
    value = fields.get(number, memoryview(b""))
    if not isinstance(value, memoryview):
        raise ValueError(f"field {number} has the wrong wire type")
    return value


def _int(fields: dict[int, int | memoryview], number: int) -> int:
    value = fields.get(number, 0)
    if not isinstance(value, int):
        raise ValueError(f"field {number} has the wrong wire type")
    return value


@dataclass(frozen=True, slots=True)
class PutChunkView:
    """A decoded `PutChunk` whose `data` is a view into the received message."""

    namespace: str
    key: bytes
    total_size: int
    offset: int
    data: memoryview
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class GetChunkView:
    """A decoded `GetChunk` whose `data` is a view into the received message."""

    index: int
    key: bytes
    found: bool
    total_size: int
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """What `decode_put_chunk_or_error` returns for bytes that are not a PutChunk, so the
    server answers INVALID_ARGUMENT instead of the transport's generic deserialization error."""

    error: str


def encode_put_chunk(
    namespace: str, key: bytes, total_size: int, offset: int, data: bytes | memoryview, ttl_seconds: int = 0
) -> bytes:
    parts: list[bytes | memoryview] = []
    if namespace:
        parts += _field_len(1, namespace.encode())
    if key:
        parts += _field_len(2, key)
    parts.append(_field_varint(3, total_size))
    parts.append(_field_varint(4, offset))
    if len(data):
        parts += _field_len(5, data)
    parts.append(_field_varint(6, ttl_seconds))
    return b"".join(parts)


def decode_put_chunk(raw: bytes) -> PutChunkView:
    f = _fields(raw)
    return PutChunkView(
        namespace=bytes(_bytes(f, 1)).decode(),
        key=bytes(_bytes(f, 2)),
        total_size=_int(f, 3),
        offset=_int(f, 4),
        data=_bytes(f, 5),
        ttl_seconds=_int(f, 6),
    )


def decode_put_chunk_or_error(raw: bytes) -> PutChunkView | MalformedMessage:
    try:
        return decode_put_chunk(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        return MalformedMessage(f"malformed PutChunk: {exc}")


def encode_get_chunk(
    index: int, key: bytes, found: bool, total_size: int = 0, offset: int = 0, data: bytes | memoryview = b""
) -> bytes:
    parts: list[bytes | memoryview] = [_field_varint(1, index)]
    if key:
        parts += _field_len(2, key)
    parts.append(_field_varint(3, int(found)))
    parts.append(_field_varint(4, total_size))
    parts.append(_field_varint(5, offset))
    if len(data):
        parts += _field_len(6, data)
    return b"".join(parts)


def decode_get_chunk(raw: bytes) -> GetChunkView:
    f = _fields(raw)
    return GetChunkView(
        index=_int(f, 1),
        key=bytes(_bytes(f, 2)),
        found=bool(_int(f, 3)),
        total_size=_int(f, 4),
        offset=_int(f, 5),
        data=_bytes(f, 6),
    )


def serialize_message_or_bytes(message: object) -> bytes:
    """Response serializer that passes pre-encoded bytes through and serializes protobufs."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[attr-defined]


def identity(raw: bytes) -> bytes:
    return raw
