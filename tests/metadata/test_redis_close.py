"""RedisStore.close() returns promptly, whatever its sweeper and watch readers are doing (real Redis).

Regression: a metadata service's teardown once waited forever on `metadata-redis-sweeper`.
CPython 3.11's asyncio.wait_for, which redis-py sends every command through, loses a cancel
that lands just as the write completes; the sweeper then looped on and close() never ended.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.services.metadata.stores.redis_store import RedisStore
from kvmesh.tools.testing.servers import ServerHandle, start_redis
from kvmesh.uri import parse_uri


async def open_store(address: str, sweep_ms: int) -> RedisStore:
    uri = parse_uri(f"redis://{address}/0?prefix=close-{uuid.uuid4().hex[:8]}&sweep_ms={sweep_ms}")
    store = await RedisStore.create(uri)
    await store.start()
    return store


async def test_close_while_the_sweeper_is_mid_call_never_hangs(redis: ServerHandle) -> None:
    # With sweep_ms=1 the sweeper is almost always inside a Redis call; closing after a
    # different number of loop turns each time lands the cancel at every point of a call,
    # including the one CPython 3.11's wait_for loses (several times in 40 tries before the fix).
    slowest = 0.0
    for turns in range(40):
        store = await open_store(redis.address, sweep_ms=1)
        await asyncio.sleep(0.005)
        for _ in range(turns):
            await asyncio.sleep(0)
        started = time.monotonic()
        async with asyncio.timeout(5):
            await store.close()
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 1.0, f"a close took {slowest:.2f} s"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[ServerHandle]:
    """A Redis of this test's own: it is paused (SIGSTOP), which must not stall other tests."""
    handle = start_redis(tmp_path)
    yield handle
    assert handle.process is not None
    os.kill(handle.process.pid, signal.SIGCONT)
    handle.stop()


async def test_close_returns_while_redis_is_frozen(own_redis: ServerHandle) -> None:
    """A Redis that stops answering holds the sweeper and a watch reader mid-call; close cuts both."""
    assert own_redis.process is not None
    store = await open_store(own_redis.address, sweep_ms=10)
    revision = await store.revision()
    watch = store.watch("", revision)
    first = asyncio.create_task(anext(watch))  # the reader now sits in XREAD BLOCK
    await asyncio.sleep(0.2)
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.3)  # the next sweep is sent and waits for a reply that never comes
        started = time.monotonic()
        async with asyncio.timeout(4):  # under the 5 s socket timeout: cancelled, not timed out
            await store.close()
        assert time.monotonic() - started < 2.0
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await watch.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("metadata-redis") and not t.done()]
