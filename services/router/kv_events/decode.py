"""Decodes vLLM's KV-event batches (msgpack) into plain records, whatever the encoding.

A batch is `[ts, [event, ...], data_parallel_rank]`. Each event is either a map tagged
`"type"` (newer vLLM) or a positional array whose first item is the type name (older vLLM).
Fields at their defaults may be omitted; unknown fields and unknown event types are ignored,
so a newer engine that adds fields (`locality`, `ownership`, ...) still decodes. Block hashes
are uint64 ints or raw bytes; both are kept as they come (they are dict keys, never mixed
within one engine). The decoding itself is in C (`_decode.c`): token ids arrive packed as
little-endian uint32 bytes, ready for block hashing, instead of one Python int each.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.router.kv_events import _decode

EngineHash = int | bytes


class DecodeError(ValueError):
    """The payload is not a KV-event batch."""


@dataclass(slots=True)
class EngineStored:
    hashes: list[EngineHash]
    parent: EngineHash | None
    tokens: bytes  # token ids, packed little-endian uint32
    block_size: int
    medium: str


@dataclass(slots=True)
class EngineRemoved:
    hashes: list[EngineHash]
    medium: str


@dataclass(frozen=True, slots=True)
class EngineCleared:
    pass


EngineEvent = EngineStored | EngineRemoved | EngineCleared

_CLEARED = EngineCleared()


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: list[EngineEvent]
    ignored: int  # events of unknown types or malformed ones


def decode_batch(payload: bytes) -> EventBatch:
    """A whole batch; raises DecodeError when the payload is not one (nothing is applied then)."""
    try:
        ts, raw, ignored = _decode.decode_batch(payload)
    except ValueError as exc:
        raise DecodeError(str(exc)) from None
    events: list[EngineEvent] = []
    for event in raw:
        kind = event[0]
        if kind == 0:
            events.append(EngineStored(*event[1:]))
        elif kind == 1:
            events.append(EngineRemoved(*event[1:]))
        else:
            events.append(_CLEARED)
    return EventBatch(ts, events, ignored)
