"""Decodes vLLM's KV-event batches (msgpack) into plain records, whatever the encoding.

A batch is `[ts, [event, ...], data_parallel_rank]`. Each event is either a map tagged
`"type"` (newer vLLM) or a positional array whose first item is the type name (older vLLM).
Fields at their defaults may be omitted; unknown fields and unknown event types are ignored,
so a newer engine that adds fields (`locality`, `ownership`, ...) still decodes. Block hashes
are uint64 ints or raw bytes; both are kept as they come (they are dict keys, never mixed
within one engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

EngineHash = int | bytes

# Positional field order of the array encoding, after the type name.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
_REMOVED_FIELDS = ("block_hashes", "medium")


class DecodeError(ValueError):
    """The payload is not a KV-event batch."""


@dataclass(frozen=True, slots=True)
class EngineStored:
    hashes: list[EngineHash]
    parent: EngineHash | None
    token_ids: list[int]
    block_size: int
    medium: str


@dataclass(frozen=True, slots=True)
class EngineRemoved:
    hashes: list[EngineHash]
    medium: str


@dataclass(frozen=True, slots=True)
class EngineCleared:
    pass


EngineEvent = EngineStored | EngineRemoved | EngineCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: list[EngineEvent]
    ignored: int  # events of unknown types or malformed ones


def _fields(raw: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    return dict(zip(names, raw[1:], strict=False))


def _hash(value: Any) -> EngineHash:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise DecodeError(f"block hash of type {type(value).__name__}")


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise DecodeError("block_hashes is not a list")
    if all(type(v) is int for v in value):  # the usual case (uint64 hashes), checked in one pass
        return value
    return [_hash(v) for v in value]


def _medium(value: Any) -> str:
    return value if isinstance(value, str) and value else "GPU"


def decode_event(raw: Any) -> EngineEvent | None:
    """One event, or None for a type this router does not know."""
    if isinstance(raw, dict):
        kind = raw.get("type")
    elif isinstance(raw, list) and raw:
        kind = raw[0]
    else:
        raise DecodeError("event is neither a map nor an array")
    if kind == "BlockStored":
        f = _fields(raw, _STORED_FIELDS)
        parent = f.get("parent_block_hash")
        tokens = f.get("token_ids") or []
        block_size = f.get("block_size") or 0
        if not isinstance(tokens, list) or not isinstance(block_size, int):
            raise DecodeError("BlockStored with bad token_ids or block_size")
        return EngineStored(
            _hashes(f.get("block_hashes") or []),
            None if parent is None else _hash(parent),
            tokens,
            block_size,
            _medium(f.get("medium")),
        )
    if kind == "BlockRemoved":
        f = _fields(raw, _REMOVED_FIELDS)
        return EngineRemoved(_hashes(f.get("block_hashes") or []), _medium(f.get("medium")))
    if kind == "AllBlocksCleared":
        return EngineCleared()
    return None


def decode_batch(payload: bytes) -> EventBatch:
    """A whole batch; raises DecodeError when the payload is not one (nothing is applied then)."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):  # a batch encoded as a map
        ts, items = raw.get("ts", 0.0), raw.get("events")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, items = raw[0], raw[1]
    else:
        raise DecodeError("batch is not [ts, events, ...]")
    if not isinstance(items, list):
        raise DecodeError("batch events is not a list")
    events: list[EngineEvent] = []
    ignored = 0
    for item in items:
        try:
            event = decode_event(item)
        except (DecodeError, TypeError, IndexError):
            ignored += 1
            continue
        if event is None:
            ignored += 1
        else:
            events.append(event)
    return EventBatch(float(ts) if isinstance(ts, int | float) else 0.0, events, ignored)
