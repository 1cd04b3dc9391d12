"""The C decoder of vLLM KV-event batches (`_decode.c`) against the format written in Python.

`reference` states the format with msgpack-python: what each field may be, what makes an event
ignored, what refuses a whole payload. Hypothesis then sends both the same batches, in both
encodings, with fields of every msgpack kind, and cuts and pads payloads.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.services.router.kv_events.decode import (
    DecodeError,
    EngineCleared,
    EngineEvent,
    EngineRemoved,
    EngineStored,
    decode_batch,
)

STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
REMOVED_FIELDS = ("block_hashes", "medium")


class Ignored(Exception):
    pass


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hash(value: Any) -> int | bytes:
    if _int(value) or isinstance(value, bytes):
        return value
    raise Ignored


def _hashes(value: Any) -> list[int | bytes]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Ignored
    return [_hash(v) for v in value]


def _tokens(value: Any) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, list) or not all(_int(v) and 0 <= v < 2**32 for v in value):
        raise Ignored
    return struct.pack(f"<{len(value)}I", *value)


def _medium(value: Any) -> str:
    return value if isinstance(value, str) and value else "GPU"


def reference_event(raw: Any) -> EngineEvent | None:
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        names = STORED_FIELDS if kind == "BlockStored" else REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        return None
    try:
        if kind == "BlockStored":
            size = fields.get("block_size")
            if size is not None and not (_int(size) and size >= 0):
                raise Ignored
            parent = fields.get("parent_block_hash")
            return EngineStored(_hashes(fields.get("block_hashes")), None if parent is None else _hash(parent),
                                _tokens(fields.get("token_ids")), size or 0, _medium(fields.get("medium")))
        if kind == "BlockRemoved":
            return EngineRemoved(_hashes(fields.get("block_hashes")), _medium(fields.get("medium")))
        if kind == "AllBlocksCleared":
            return EngineCleared()
    except Ignored:
        pass
    return None


def reference(payload: bytes) -> tuple[float, list[EngineEvent], int] | None:
    """(ts, events, ignored), or None when the payload is refused."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        return None
    if isinstance(raw, dict):
        ts, items = raw.get("ts", 0.0), raw.get("events")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, items = raw[0], raw[1]
    else:
        return None
    if not isinstance(items, list):
        return None
    events = [reference_event(item) for item in items]
    kept = [e for e in events if e is not None]
    return (float(ts) if isinstance(ts, int | float) else 0.0), kept, len(events) - len(kept)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, width=32),
    st.text(max_size=8), st.binary(max_size=8),
)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
hashes = st.lists(st.integers(0, 2**64 - 1) | st.binary(min_size=1, max_size=32), max_size=6)
tokens = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 127), max_size=40) | st.lists(
    st.integers(2**32 - 2, 2**33) | st.integers(-3, 3), max_size=4)  # ids just past uint32, negative ones
field_values = {
    "block_hashes": hashes | anything,
    "parent_block_hash": st.none() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=32) | anything,
    "token_ids": tokens | anything,
    "block_size": st.integers(0, 64) | anything,
    "lora_id": anything,
    "medium": st.sampled_from(["GPU", "CPU", "", "disk"]) | anything,
}


@st.composite
def events(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"]))
    names = [n for n in STORED_FIELDS if draw(st.booleans())]
    values = {n: draw(field_values[n]) for n in names}
    if draw(st.booleans()):  # the map encoding, maybe with an unknown field
        event = {"type": kind, **values}
        if draw(st.booleans()):
            event["ownership"] = draw(anything)
        return event
    order = STORED_FIELDS if kind == "BlockStored" else REMOVED_FIELDS
    count = draw(st.integers(0, len(order) + 2))
    return [kind, *[values.get(n, draw(field_values[n])) if i < len(order) else draw(anything)
                    for i, n in enumerate((*order, "x", "y")[:count])]]


batches = st.one_of(
    st.tuples(st.floats(allow_nan=False, width=32) | st.integers(0, 2**40) | anything, st.lists(events(), max_size=6),
              st.lists(anything, max_size=2)).map(lambda t: [t[0], t[1], *t[2]]),
    st.fixed_dictionaries({"ts": st.floats(allow_nan=False, width=32), "events": st.lists(events(), max_size=6)}),
    anything,
)


def outcome(payload: bytes) -> tuple[float, list[EngineEvent], int] | None:
    try:
        batch = decode_batch(payload)
    except DecodeError:
        return None
    return batch.ts, batch.events, batch.ignored


@settings(max_examples=300, deadline=None)
@given(batch=batches, use_single_float=st.booleans())
def test_the_c_decoder_agrees_with_the_reference(batch: Any, use_single_float: bool) -> None:
    payload = msgpack.packb(batch, use_single_float=use_single_float)
    assert outcome(payload) == reference(payload)


@settings(max_examples=150, deadline=None)
@given(batch=batches, cut=st.integers(0, 400), junk=st.binary(max_size=4))
def test_cut_or_padded_payloads_are_refused_or_agree(batch: Any, cut: int, junk: bytes) -> None:
    payload = msgpack.packb(batch)
    for damaged in (payload[: max(0, len(payload) - 1 - cut)], payload + junk, junk + payload):
        assert outcome(damaged) == reference(damaged)


def test_hostile_shapes_are_refused_without_work() -> None:
    deep = b"\x91" * 10_000 + b"\xc0"  # arrays nested 10,000 deep
    huge = b"\x92\x00\xdd\xff\xff\xff\xff"  # [0, <an array claiming 2^32 - 1 events>]
    for payload in (deep, huge, b"", b"\xc1", msgpack.packb([1.0, [], 0]) + b"x"):
        with pytest.raises(DecodeError):
            decode_batch(payload)
    assert decode_batch(msgpack.packb([1.0, [["BlockRemoved", [[[[[[1]]]]]]]], 0])).ignored == 1


def test_token_ids_arrive_packed_and_big_ids_are_exact() -> None:
    event = {"type": "BlockStored", "block_hashes": [2**64 - 1, -(2**63)], "parent_block_hash": b"\x00" * 32,
             "token_ids": [0, 127, 128, 65_535, 2**32 - 1], "block_size": 2, "medium": "CPU"}
    (stored,) = decode_batch(msgpack.packb([0.5, [event], 0])).events
    assert stored == EngineStored([2**64 - 1, -(2**63)], b"\x00" * 32, struct.pack("<5I", 0, 127, 128, 65_535,
                                                                                     2**32 - 1), 2, "CPU")


@pytest.mark.parametrize("bad_at", [None, 0, 40_000, 99_999])
def test_a_big_prefill_decodes_exactly_and_a_bad_id_anywhere_is_caught(bad_at: int | None) -> None:
    ids = [(i * 7919) % 150_000 for i in range(100_000)]  # 1-, 2-, 3- and 5-byte encodings
    if bad_at is not None:
        ids[bad_at] = 2**32
    event = {"type": "BlockStored", "block_hashes": [1], "token_ids": ids, "block_size": 100_000}
    payload = msgpack.packb([1.0, [event, {"type": "AllBlocksCleared"}], 0])
    assert outcome(payload) == reference(payload)
    assert outcome(payload[:-300]) is None  # cut inside the ids


def test_a_big_prefill_is_read_without_holding_the_interpreter() -> None:
    # The event loop must keep running while a worker thread decodes a big prefill's ids.
    ids = [(i * 7919) % 60_000 for i in range(4_000_000)]
    payload = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": ids,
                                    "block_size": 1}], 0])
    window: list[float] = []

    def decode() -> None:
        window.append(time.perf_counter())
        decode_batch(payload)
        window.append(time.perf_counter())

    worker = threading.Thread(target=decode)
    ticks: list[float] = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    start, end = window
    marks = [start, *(t for t in ticks if start < t < end), end]
    silence = max(b - a for a, b in itertools.pairwise(marks))
    # Held, the loop would stop for the whole decode (about 20 ms here); released, only for
    # interpreter hand-overs.
    assert end - start > 0.005 and silence < 0.5 * (end - start), (end - start, silence)
