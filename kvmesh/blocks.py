"""Block keys: the one place where prompts become chained block hashes.

A prompt (token ids, or UTF-8 text for a gateway without a tokenizer) is cut into full
blocks; `h[i] = H(seed, namespace, model, h[i-1], block_i)` so one hash names the whole
prefix up to that block. H is keyed BLAKE2b truncated to 128 bits: cache keys are those
16 bytes, and the router's block id is the first 8 bytes as an unsigned 64-bit integer.
Chains are hashed in C (`_blocks.c`): one call per prompt instead of four per block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvmesh import _blocks

KEY_BYTES = 16
DEFAULT_BLOCK_SIZE = 16
DEFAULT_TEXT_BLOCK_BYTES = 64
_ROOT = b"\x00" * KEY_BYTES
_U64 = struct.Struct("<Q")


def block_id(key: bytes) -> int:
    """The router's block id: the first 8 bytes of a 16-byte key, little-endian u64."""
    return int(_U64.unpack_from(key, 0)[0])


def block_ids(keys: Sequence[bytes]) -> list[int]:
    """`block_id` of each key, in one C call."""
    return _blocks.ids(keys)


@dataclass(frozen=True)
class BlockHasher:
    """Chained block hashing for one (seed, namespace, model).

    The keyed state after the namespace and model is built once (`Chain`) and copied per
    block, so a block costs its two BLAKE2b compressions and nothing else.
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
        prefix = _U64.pack(len(ns)) + ns + _U64.pack(len(model)) + model
        base.update(prefix)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_chain", _blocks.Chain(self.seed, prefix))

    def _keys(self, raw: bytes, step: int, parent: bytes) -> list[bytes]:
        """Chained keys of each full `step`-byte piece of `raw`."""
        if len(parent) != KEY_BYTES:
            raise ValueError(f"a parent key is {KEY_BYTES} bytes")
        return self._chain.keys(raw, step, parent)  # type: ignore[attr-defined]

    def token_keys(self, tokens: Sequence[int] | np.ndarray, parent: bytes = _ROOT) -> list[bytes]:
        """16-byte keys of each full block of token ids (uint32), chained from `parent`."""
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise ValueError("token ids must fit in uint32")
        return self._keys(arr.astype("<u4").tobytes(), self.block_size * 4, parent)

    def packed_keys(self, raw: bytes, parent: bytes = _ROOT) -> list[bytes]:
        """16-byte keys of each full block of token ids already packed as little-endian uint32.

        The same keys as `token_keys` on the unpacked ids; for callers that pack ids themselves
        (`struct.pack` of a decoded list is several times faster than going through numpy).
        """
        return self._keys(raw, self.block_size * 4, parent)

    def text_keys(self, text: str, parent: bytes = _ROOT) -> list[bytes]:
        """16-byte keys of each full block of `text_block_bytes` UTF-8 bytes."""
        return self._keys(text.encode("utf-8"), self.text_block_bytes, parent)

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
        return block_ids(self.token_keys(tokens))

    def text_block_ids(self, text: str) -> list[int]:
        """Router block ids (u64) of each full block of text."""
        return block_ids(self.text_keys(text))
