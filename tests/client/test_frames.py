"""The data plane's frame codec (kvmesh.frames): round trips and every malformed metadata shape."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmesh import frames
from kvmesh.frames import Flag, FrameError, Op

keys = st.lists(st.binary(min_size=1, max_size=64), max_size=20)


@given(keys=keys, namespace=st.text(max_size=20), ttl=st.integers(0, 2**32 - 1), data=st.data())
def test_requests_round_trip(keys: list[bytes], namespace: str, ttl: int, data: st.DataObject) -> None:
    sizes = data.draw(st.lists(st.integers(0, 2**40), min_size=len(keys), max_size=len(keys)))
    for op in Op:
        encoded = frames.encode_request(op, 77, namespace, keys, sizes if op == Op.PUT else None, ttl)
        header = frames.decode_header(encoded)
        assert (header.op, header.request_id, header.entries, header.status) == (op, 77, len(keys), 0)
        assert header.meta_len == len(encoded) - frames.HEADER_BYTES
        assert header.payload_len == (sum(sizes) if op == Op.PUT else 0)
        request = frames.decode_request(op, len(keys), encoded[frames.HEADER_BYTES :])
        assert request.namespace == namespace and request.keys == keys and request.ttl_seconds == ttl
        assert request.sizes == (sizes if op == Op.PUT else [])
        bound = frames.request_meta_bound(len(keys), len(namespace.encode()), 64, op == Op.PUT)
        assert header.meta_len <= bound


def test_header_layout_is_the_documented_one() -> None:
    encoded = frames.encode_header(Op.GET, 0x01020304, 5, 6, 7, status=8, flags=Flag.RESPONSE)
    assert len(encoded) == 32
    assert encoded[:4] == b"KD\x01\x02"
    assert encoded[4:8] == bytes([4, 3, 2, 1])  # little-endian request id
    assert encoded[8:10] == b"\x08\x00" and encoded[10:12] == b"\x01\x00"
    assert encoded[12:16] == b"\x05\x00\x00\x00" and encoded[16:20] == b"\x06\x00\x00\x00"
    assert encoded[20:28] == b"\x07" + bytes(7) and encoded[28:] == bytes(4)


def test_responses_round_trip() -> None:
    head = frames.encode_lengths(3, [5, frames.MISSING, 0])
    header = frames.decode_header(head)
    assert header.flags & Flag.RESPONSE and header.payload_len == 5
    assert frames.decode_lengths(header.entries, head[frames.HEADER_BYTES :]) == (5, frames.MISSING, 0)
    error = frames.encode_error(Op.PUT, 9, 8, "no room")
    header = frames.decode_header(error)
    assert (header.status, header.request_id, error[frames.HEADER_BYTES :]) == (8, 9, b"no room")


@pytest.mark.parametrize(
    ("meta", "entries"),
    [
        (b"", 0),  # no namespace length
        (b"\x05\x00ab", 0),  # namespace cut short
        (b"\x00\x00\x00\x00", 1),  # a key announced, none there
        (b"\x00\x00\x00\x00\x03\x00ab", 1),  # key cut short
        (b"\x00\x00\x00\x00\x01\x00ab", 1),  # a byte left over
        (b"\x02\x00\xff\xfe\x00\x00\x00\x00", 0),  # namespace not UTF-8
    ],
)
def test_malformed_request_metadata_is_a_frame_error(meta: bytes, entries: int) -> None:
    with pytest.raises(FrameError):
        frames.decode_request(Op.GET, entries, meta)


def test_bad_magic_version_and_lengths() -> None:
    with pytest.raises(FrameError, match="magic"):
        frames.decode_header(b"XX" + bytes(30))
    with pytest.raises(FrameError, match="version"):
        frames.decode_header(b"KD\x09" + bytes(29))
    with pytest.raises(FrameError):
        frames.decode_lengths(2, bytes(8))
    with pytest.raises(ValueError, match="one size per key"):
        frames.encode_request(Op.PUT, 1, "", [b"a"], [])
