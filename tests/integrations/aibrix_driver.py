"""Runs inside the aibrix-kvcache virtualenv (started by test_aibrix_backend.py): drives AIBrix's own
cache manager with the kvmesh L2 backend and prints one JSON line of results.

    python aibrix_driver.py roundtrip|after_kill      (env: KVMESH_METADATA, AIBRIX_* set by the test)
"""

from __future__ import annotations

import json
import sys

import torch
from aibrix_kvcache import BaseKVCacheManager, KVCacheConfig, ModelSpec, TokenListView, cache_manager
from aibrix_kvcache.memory import TensorPoolAllocator
from aibrix_kvcache.spec import KVCacheBlockLayout, KVCacheBlockSpec, KVCacheTensorSpec

import kvmesh.integrations.aibrix  # noqa: F401  (registers the KVMESH backend)

BLOCK_TOKENS = 16
BLOCKS = 16
SPEC = KVCacheBlockSpec(block_ntokens=BLOCK_TOKENS, block_dtype=torch.bfloat16, block_layout=KVCacheBlockLayout.NCLD,
                        tensor_spec=KVCacheTensorSpec(heads=[1, 2], layers=list(range(8)), head_size=32))


def expected(block: int) -> torch.Tensor:
    """Block `block`'s KV, the same in every process (so a later process can check what it reads)."""
    gen = torch.Generator().manual_seed(1000 + block)
    return torch.rand(SPEC.block_nbytes // 2, generator=gen).to(torch.bfloat16)


def fill(handle: object, first_block: int) -> None:
    for i, mr in enumerate(handle.memory_regions):  # type: ignore[attr-defined]
        mr.slab[mr.addr : mr.addr + mr.length].view(torch.bfloat16).copy_(expected(first_block + i))


def matches(handle: object, first_block: int) -> bool:
    return all(torch.equal(mr.slab[mr.addr : mr.addr + mr.length].view(torch.bfloat16), expected(first_block + i))
               for i, mr in enumerate(handle.memory_regions))  # type: ignore[attr-defined]


def main(mode: str) -> dict[str, object]:
    cache_manager.TESTING_DISABLE_PIN_MEMORY = True
    TensorPoolAllocator.SLAB_MAX_NBYTES = SPEC.block_nbytes * 64
    mgr = BaseKVCacheManager(config=KVCacheConfig(block_spec=SPEC, model_spec=ModelSpec(4096)))
    tokens = TokenListView(list(range(BLOCKS * BLOCK_TOKENS)))
    out: dict[str, object] = {"backend": mgr._l2_cache._backend.name if mgr._l2_cache else None}
    try:
        if mode == "roundtrip":
            handle = mgr.allocate_for(None, tokens).value
            fill(handle, 0)
            put = mgr.put(None, tokens, handle)
            out["put"] = put.value if put.is_ok() else str(put)
            exists = mgr.exists(None, tokens)
            out["exists"] = exists.value if exists.is_ok() else str(exists)
            got = mgr.acquire(None, tokens)
            out["get_tokens"] = got.value[0] if got.is_ok() else 0
            out["get_equal"] = got.is_ok() and matches(got.value[1], 0)
            if got.is_ok():
                got.value[1].release()
            # Delete the last 4 blocks: the first 12 remain.
            cut = 12 * BLOCK_TOKENS
            out["delete_ok"] = mgr.delete(tokens[:cut], tokens[cut:]).is_ok()
            left = mgr.exists(None, tokens)
            out["exists_after_delete"] = left.value if left.is_ok() else 0
            out["get_deleted_not_found"] = mgr.acquire(tokens[:cut], tokens[cut:]).is_not_found()
            # Put them back for the next phase.
            handle2 = mgr.allocate_for(tokens[:cut], tokens[cut:]).value
            fill(handle2, 12)
            out["put_back"] = mgr.put(tokens[:cut], tokens[cut:], handle2).is_ok()
        else:
            got = mgr.acquire(None, tokens)
            out["get_ok_or_miss"] = got.is_ok() or got.is_not_found()
            n = got.value[0] if got.is_ok() else 0
            out["get_tokens"] = n
            out["get_equal"] = (not got.is_ok()) or matches(got.value[1], 0)
            if got.is_ok():
                got.value[1].release()
            exists = mgr.exists(None, tokens)
            out["exists"] = exists.value if exists.is_ok() else 0
            # New blocks still go to the node that is left (a status, never an exception).
            fresh = TokenListView(list(range(5000, 5000 + 4 * BLOCK_TOKENS)))
            handle = mgr.allocate_for(None, fresh).value
            fill(handle, 100)
            put = mgr.put(None, fresh, handle)
            out["put_after_kill"] = put.value if put.is_ok() else str(put)
            back = mgr.acquire(None, fresh)
            complete = back.is_ok() and back.value[0] == 4 * BLOCK_TOKENS
            out["get_after_kill_equal"] = complete and matches(back.value[1], 100)
            if back.is_ok():
                back.value[1].release()
    finally:
        mgr.close()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
