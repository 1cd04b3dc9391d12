"""The hand-coded PutChunk/GetChunk codec is byte-compatible with the generated protobuf classes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh import wire
from kvmesh.v1 import cachenode_pb2 as pb

u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)


@given(st.text(max_size=20), st.binary(max_size=40), u64, u64, st.binary(max_size=3000), u32)
def test_put_chunk_matches_protobuf(namespace: str, key: bytes, total: int, offset: int, data: bytes, ttl: int) -> None:
    raw = wire.encode_put_chunk(namespace, key, total, offset, data, ttl)
    ref = pb.PutChunk(namespace=namespace, key=key, total_size=total, offset=offset, data=data, ttl_seconds=ttl)
    assert pb.PutChunk.FromString(raw) == ref
    view = wire.decode_put_chunk(ref.SerializeToString())
    assert (view.namespace, view.key, view.total_size, view.offset, bytes(view.data), view.ttl_seconds) == (
        namespace, key, total, offset, data, ttl,
    )


@given(u32, st.binary(max_size=40), st.booleans(), u64, u64, st.binary(max_size=3000))
def test_get_chunk_matches_protobuf(index: int, key: bytes, found: bool, total: int, offset: int, data: bytes) -> None:
    raw = wire.encode_get_chunk(index, key, found, total, offset, data)
    ref = pb.GetChunk(index=index, key=key, found=found, total_size=total, offset=offset, data=data)
    assert pb.GetChunk.FromString(raw) == ref
    view = wire.decode_get_chunk(ref.SerializeToString())
    assert (view.index, view.key, view.found, view.total_size, view.offset, bytes(view.data)) == (
        index, key, found, total, offset, data,
    )


def test_unknown_fields_are_skipped() -> None:
    raw = pb.PutChunk(key=b"k", data=b"d").SerializeToString() + bytes([0x48, 0x05])  # field 9 varint
    view = wire.decode_put_chunk(raw)
    assert view.key == b"k" and bytes(view.data) == b"d"


@pytest.mark.parametrize("raw", [b"\x12\x05ab", b"\x80", b"\x2a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b"])
def test_malformed_messages_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode_put_chunk(raw)
