"""Block keys: the one place where prompts become chained block hashes.

A prompt (token ids, or UTF-8 text for a gateway without a tokenizer) is cut into full
blocks; `h[i] = H(seed, namespace, model, h[i-1], block_i)` so one hash names the whole
prefix up to that block. H is keyed BLAKE2b truncated to 128 bits: cache keys are those
16 bytes, and the router's block id is the first 8 bytes as an unsigned 64-bit integer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_BYTES = 16
DEFAULT_BLOCK_SIZE = 16
DEFAULT_TEXT_BLOCK_BYTES = 64
_ROOT = b"\x00" * KEY_BYTES
_U64 = struct.Struct("<Q")


def block_id(key: bytes) -> int:
    """The router's block id: the first 8 bytes of a 16-byte key, little-endian u64."""
    return int(_U64.unpack_from(key, 0)[0])


@dataclass(frozen=True)
class BlockHasher:
    """Chained block hashing for one (seed, namespace, model).

    Building the keyed base hasher once and copying it per block keeps hashing a
    2,048-token prompt well under the router's latency budget.
    """

    seed: bytes = b"kvmesh-v1"
    namespace: str = ""
    model: str = ""
    block_size: int = DEFAULT_BLOCK_SIZE
    text_block_bytes: int = DEFAULT_TEXT_BLOCK_BYTES

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.text_block_bytes <= 0:
            raise ValueError("text_block_bytes must be positive")
        if len(self.seed) > 64:
            raise ValueError("seed is at most 64 bytes (BLAKE2b key)")
        base = hashlib.blake2b(digest_size=KEY_BYTES, key=self.seed)
        ns = self.namespace.encode()
        model = self.model.encode()
        # Length-prefixed so ("ab", "c") and ("a", "bc") never collide.
        base.update(_U64.pack(len(ns)) + ns + _U64.pack(len(model)) + model)
        object.__setattr__(self, "_base", base)

    def _chain(self, pieces: Sequence[bytes], parent: bytes = _ROOT) -> list[bytes]:
        base = self._base  # type: ignore[attr-defined]
        out: list[bytes] = []
        for piece in pieces:
            h = base.copy()
            h.update(parent)
            h.update(piece)
            parent = h.digest()
            out.append(parent)
        return out

    def token_keys(self, tokens: Sequence[int] | np.ndarray, parent: bytes = _ROOT) -> list[bytes]:
        """16-byte keys of each full block of token ids (uint32), chained from `parent`."""
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise ValueError("token ids must fit in uint32")
        full = (arr.size // self.block_size) * self.block_size
        raw = arr[:full].astype("<u4").tobytes()
        step = self.block_size * 4
        return self._chain([raw[i : i + step] for i in range(0, len(raw), step)], parent)

    def packed_keys(self, raw: bytes, parent: bytes = _ROOT) -> list[bytes]:
        """16-byte keys of each full block of token ids already packed as little-endian uint32.

        The same keys as `token_keys` on the unpacked ids; for callers that pack ids themselves
        (`struct.pack` of a decoded list is several times faster than going through numpy).
        """
        step = self.block_size * 4
        full = (len(raw) // step) * step
        return self._chain([raw[i : i + step] for i in range(0, full, step)], parent)

    def text_keys(self, text: str, parent: bytes = _ROOT) -> list[bytes]:
        """16-byte keys of each full block of `text_block_bytes` UTF-8 bytes."""
        raw = text.encode("utf-8")
        step = self.text_block_bytes
        full = (len(raw) // step) * step
        return self._chain([raw[i : i + step] for i in range(0, full, step)], parent)

    def id_keys(self, ids: Sequence[int]) -> list[bytes]:
        """16-byte cache keys for precomputed chained block ids (such as a trace's hash_ids).

        The ids already name whole prefixes, so each key only mixes in the namespace and model.
        """
        base = self._base  # type: ignore[attr-defined]
        out: list[bytes] = []
        for i in ids:
            if i < 0 or i > 0xFFFFFFFFFFFFFFFF:
                raise ValueError("block ids must fit in uint64")
            h = base.copy()
            h.update(b"id" + _U64.pack(i))
            out.append(h.digest())
        return out

    def token_block_ids(self, tokens: Sequence[int] | np.ndarray) -> list[int]:
        """Router block ids (u64) of each full block of token ids."""
        return [block_id(k) for k in self.token_keys(tokens)]

    def text_block_ids(self, text: str) -> list[int]:
        """Router block ids (u64) of each full block of text."""
        return [block_id(k) for k in self.text_keys(text)]
