"""One mesh value per block, holding every layer's KV of that block, sealed with a checksum.

    "KVMB" | version u8 | layout length u32 | layout | payload | BLAKE2b-128(key | header | payload)

The layout (layer names, dtypes, per-block shapes) must equal the reader's own, the size must be
exact and the checksum must match, or the block is refused: a truncated, corrupted, misplaced
(stored under another key) or foreign-layout value is never loaded into the engine.
"""

from __future__ import annotations

import hashlib
import struct

MAGIC = b"KVMB"
VERSION = 1
DIGEST_BYTES = 16
_HEAD = struct.Struct("<4sBI")


class BlockCodec:
    """Seals and opens block values of one fixed layout and payload size."""

    def __init__(self, layout: bytes, payload_bytes: int) -> None:
        self.header = _HEAD.pack(MAGIC, VERSION, len(layout)) + layout
        self.payload_bytes = payload_bytes
        self.value_bytes = len(self.header) + payload_bytes + DIGEST_BYTES

    def _digest(self, key: bytes, payload: bytes | memoryview) -> bytes:
        h = hashlib.blake2b(key, digest_size=DIGEST_BYTES)
        h.update(self.header)
        h.update(payload)
        return h.digest()

    def seal(self, key: bytes, payload: bytes | memoryview) -> bytes:
        if len(payload) != self.payload_bytes:
            raise ValueError(f"block payload is {len(payload)} bytes, expected {self.payload_bytes}")
        return b"".join((self.header, payload, self._digest(key, payload)))

    def open(self, key: bytes, value: bytes | memoryview) -> memoryview | None:
        """The payload, or None when the value is not a sound block of this layout for `key`."""
        view = memoryview(value)
        if len(view) != self.value_bytes or view[: len(self.header)] != self.header:
            return None
        end = len(self.header) + self.payload_bytes
        payload = view[len(self.header) : end]
        if self._digest(key, payload) != view[end:]:
            return None
        return payload
