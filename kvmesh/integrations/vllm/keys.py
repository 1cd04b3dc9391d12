"""Cache keys of a vLLM request's blocks, from kvmesh's own block hashing (`kvmesh.blocks`).

Keys depend only on what changes the KV: the model, the namespace, the block size, the token ids,
the LoRA adapter and vLLM's per-request cache salt. vLLM's own block hashes depend on its hash
seed and settings, so two engines would not agree on them; these keys they always agree on. With
neither LoRA nor salt the keys are exactly `BlockHasher(namespace, model, block_size)`'s, the ones
the router and `CacheClient.keys_for_tokens` compute.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kvmesh.blocks import KEY_BYTES, BlockHasher

_ROOT = b"\x00" * KEY_BYTES


def hasher(model: str, namespace: str, block_size: int) -> BlockHasher:
    return BlockHasher(namespace=namespace, model=model, block_size=block_size)


def request_root(lora_name: str | None, cache_salt: str | None) -> bytes:
    """The chain's starting point: zeros for a plain request, else a digest of LoRA and salt."""
    if not lora_name and not cache_salt:
        return _ROOT
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvmesh-vllm-req")
    for part in (lora_name or "", cache_salt or ""):
        raw = part.encode()
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.digest()


def block_keys(blocks: BlockHasher, token_ids: Sequence[int], lora_name: str | None = None,
               cache_salt: str | None = None) -> list[bytes]:
    """Keys of each full block of `token_ids`."""
    return blocks.token_keys(token_ids, parent=request_root(lora_name, cache_salt))


def shard_key(key: bytes, rank: int, world_size: int) -> bytes:
    """The key of one tensor-parallel rank's share of a block (the key itself without TP)."""
    if world_size <= 1:
        return key
    return hashlib.blake2b(key + f"tp{rank}/{world_size}".encode(), digest_size=KEY_BYTES).digest()
