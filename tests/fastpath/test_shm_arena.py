"""The shared-memory arena: a named segment other processes map, cleaned up even after SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kvmesh.client.local import LocalPathUnavailable, SegmentMapping
from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.shm_arena import SHM_DIR, ShmArena, remove_stale_segments


def test_segment_is_shared_with_another_mapping_and_unlinked_on_close() -> None:
    arena = ShmArena(1 << 20)
    assert arena.name.startswith(f"kvmesh-{os.getpid()}-")
    assert (SHM_DIR / arena.name).exists()
    off = arena.allocate(1000)
    assert off is not None
    arena.view(off, 5)[:] = b"hello"
    peer = SegmentMapping(arena.name, arena.size)
    assert bytes(peer.view(off, 5)) == b"hello"
    peer.view(off, 5)[:] = b"HELLO"  # a client writes in place; the node sees it
    assert bytes(arena.view(off, 5)) == b"HELLO"
    with pytest.raises(ValueError, match="outside segment"):
        peer.view(arena.size - 1, 2)
    arena.close()
    arena.close()  # idempotent
    assert not (SHM_DIR / arena.name).exists()
    # The client's mapping outlives the unlink (POSIX semantics): no crash, same bytes.
    assert bytes(peer.view(off, 5)) == b"HELLO"
    peer.close()
    with pytest.raises(LocalPathUnavailable):
        SegmentMapping(arena.name, arena.size)


def test_allocator_reuses_freed_extents() -> None:
    arena = ShmArena(4096, alignment=64)
    try:
        a = arena.allocate(4096)
        assert a == 0
        assert arena.allocate(1) is None
        arena.free(a, 4096)
        assert arena.allocate(100) == 0
    finally:
        arena.close()


def test_capacity_larger_than_dev_shm_is_refused() -> None:
    st = os.statvfs(SHM_DIR)
    with pytest.raises(ResourceExhausted, match="does not fit"):
        ShmArena(st.f_blocks * st.f_frsize * 2)


def test_segment_of_a_sigkilled_node_is_removed_by_the_next() -> None:
    code = textwrap.dedent(
        """
        import os, signal
        from kvmesh.services.cachenode.storage.shm_arena import ShmArena
        arena = ShmArena(1 << 20)
        print(arena.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert proc.returncode == -9
    name = proc.stdout.strip()
    assert (SHM_DIR / name).exists()  # SIGKILL left it behind
    assert name in remove_stale_segments()
    assert not (SHM_DIR / name).exists()
    arena = ShmArena(4096)  # a live node's own segment is never taken for stale
    try:
        remove_stale_segments()
        assert (SHM_DIR / arena.name).exists()
    finally:
        arena.close()


async def test_memory_storage_defaults_to_shared_memory_when_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmesh.services.cachenode.storage import shm_arena
    from kvmesh.services.cachenode.storage.arena import HeapArena
    from kvmesh.services.cachenode.storage.memory import MemoryStorage
    from kvmesh.uri import parse_uri

    storage = await MemoryStorage.create(parse_uri("memory://?capacity=1MiB"))
    try:
        assert isinstance(storage.arena, ShmArena)
    finally:
        await storage.close()
    monkeypatch.setattr(shm_arena, "_free_bytes", lambda directory: 64 * 1024)  # a container's small /dev/shm
    too_big = shm_arena.AutoArena.create(1 << 20)
    try:
        assert isinstance(too_big, HeapArena)
    finally:
        too_big.close()
