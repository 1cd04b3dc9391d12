"""Big batches copied by several threads: every byte lands, shares are even, a cancelled caller waits."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.client.buffers import CopyPool, byte_shares

MiB = 1024**2


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=12), st.integers(1, 6))
def test_shares_cover_every_byte_once_and_are_even(sizes: list[int], count: int) -> None:
    sources = [np.frombuffer(os.urandom(n), dtype=np.uint8) for n in sizes]
    dests = [np.zeros(n + 3, dtype=np.uint8) for n in sizes]
    shares = byte_shares(list(zip(dests, sources, strict=True)), count)
    assert len(shares) <= count
    for share in shares:
        for dst, src in share:
            np.copyto(dst[: len(src)], src)
    for dst, src in zip(dests, sources, strict=True):
        assert bytes(dst[: len(src)]) == bytes(src) and not dst[len(src) :].any()
    total = sum(sizes)
    if total and count > 1:
        share_bytes = [sum(len(src) for _, src in share) for share in shares]
        assert max(share_bytes) <= -(-total // count)


async def test_a_batch_is_copied_whole_by_several_threads() -> None:
    pool = CopyPool(threads=2)
    try:
        sources = [np.frombuffer(os.urandom(3 * MiB), dtype=np.uint8) for _ in range(6)]
        dests = [np.empty(3 * MiB, dtype=np.uint8) for _ in range(6)]
        await pool.copy_all(list(zip(dests, sources, strict=True)), 18 * MiB)
        assert all(np.array_equal(d, s) for d, s in zip(dests, sources, strict=True))
    finally:
        pool.close()


async def test_a_cancelled_caller_returns_only_after_the_copies_end() -> None:
    """No thread may still write a buffer the caller has taken back."""
    pool = CopyPool(threads=2)
    try:
        source = np.frombuffer(os.urandom(256 * MiB), dtype=np.uint8)
        dest = np.zeros(256 * MiB, dtype=np.uint8)
        task = asyncio.get_running_loop().create_task(pool.copy_all([(dest, source)], 256 * MiB))
        await asyncio.sleep(0)  # the copies start
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dest[-1] == source[-1] and np.array_equal(dest[-MiB:], source[-MiB:])
    finally:
        pool.close()
