"""The chunk assembler (BatchPut's write path) against real storages: the zero-copy memory
storage over a heap and a shared-memory arena, and the buffered, batched disk storage."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.chunk_assembly import ChunkAssembler
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.services.cachenode.write_budget import WriteBounds, WriteBudget
from kvmesh.wire import PutChunkView

NS = "ns"
KINDS = ["memory-heap", "memory-shm", "disk"]


def chunks(key: bytes, value: bytes, step: int, namespace: str = NS, ttl: int = 0) -> list[PutChunkView]:
    return [
        PutChunkView(namespace, key, len(value), off, memoryview(value[off : off + step]), ttl)
        for off in range(0, max(len(value), 1), step)
    ]


@pytest.fixture(params=KINDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    uri = {
        "memory-heap": "memory://?capacity=4MiB&arena=heap",
        "memory-shm": "memory://?capacity=4MiB&arena=shm",
        "disk": f"disk://{tmp_path}/store?capacity=4MiB&sync=false",
    }[request.param]
    built = await build_storage(uri)
    try:
        yield built
    finally:
        await built.close()


async def assemble(storage: Storage, messages: list[PutChunkView], **kwargs: object) -> ChunkAssembler:
    assembler = ChunkAssembler(storage, **kwargs)  # type: ignore[arg-type]
    try:
        for message in messages:
            await assembler.add(message)
        await assembler.finish()
    finally:
        assembler.abort()
    return assembler


def failures(assembler: ChunkAssembler) -> dict[bytes, tuple[str, str]]:
    return {e.key: (e.code, e.message) for e in assembler.errors}


async def test_single_and_multi_chunk_values_are_stored_whole(storage: Storage) -> None:
    values = {f"k{i}".encode(): os.urandom(size) for i, size in enumerate([0, 1, 1000, 70_000, 300_001])}
    messages = [m for k, v in values.items() for m in chunks(k, v, 65_536)]
    assembler = await assemble(storage, messages)
    assert assembler.stored == len(values) and not assembler.errors
    for key, value in values.items():
        assert await storage.get(NS, key) == value, key
    assert storage.stats().used_bytes == sum(len(v) for v in values.values())


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        ("swap", "chunk out of order: offset 200, expected 100"),
        ("total", "inconsistent total_size: 999 after 300"),
        ("overrun", "chunks overrun the value: 301 bytes of 300"),
        ("late", "chunk out of order: first chunk of a value at offset 100, not 0"),
    ],
)
async def test_a_bad_chunk_fails_its_key_only(storage: Storage, mangle: str, message: str) -> None:
    value = os.urandom(300)
    bad = chunks(b"bad", value, 100)
    if mangle == "swap":
        bad[1], bad[2] = bad[2], bad[1]
    elif mangle == "total":
        bad[1] = PutChunkView(NS, b"bad", 999, 100, bad[1].data, 0)
    elif mangle == "overrun":
        bad[2] = PutChunkView(NS, b"bad", 300, 200, memoryview(b"x" * 101), 0)
    else:
        bad = bad[1:]
    assembler = await assemble(storage, [*chunks(b"before", value, 100), *bad, *chunks(b"after", value, 100)])
    # One error for the key, however many of its chunks followed the bad one.
    assert failures(assembler) == {b"bad": ("INVALID_ARGUMENT", message)}
    assert assembler.stored == 2
    assert await storage.exists(NS, [b"before", b"bad", b"after"]) == [True, False, True]
    assert storage.stats().used_bytes == 600  # the failed value's space was freed


async def test_a_key_switch_or_the_end_mid_value_fails_it(storage: Storage) -> None:
    value = os.urandom(300)
    messages = [*chunks(b"cut", value, 100)[:2], *chunks(b"next", value, 100), *chunks(b"tail", value, 100)[:1]]
    assembler = await assemble(storage, messages)
    assert failures(assembler) == {
        b"cut": ("INVALID_ARGUMENT", "value incomplete: 200 of 300 bytes before the next key"),
        b"tail": ("INVALID_ARGUMENT", "stream ended with the value incomplete: 100 of 300 bytes"),
    }
    assert assembler.stored == 1
    assert await storage.exists(NS, [b"cut", b"next", b"tail"]) == [False, True, False]
    assert storage.stats().used_bytes == 300


async def test_limits_and_a_full_storage_fail_their_key(storage: Storage) -> None:
    limits = Limits(max_value_bytes=1000, namespaces=frozenset({NS}))
    messages = [
        *chunks(b"denied", b"x", 1, namespace="other"),
        *chunks(b"big", b"b" * 5000, 500),  # over the limit: its later chunks are ignored
        *chunks(b"fine", b"y", 1),
        *chunks(b"", b"z", 1),
    ]
    assembler = await assemble(storage, messages, limits=limits)
    assert failures(assembler) == {
        b"denied": ("PERMISSION_DENIED", "namespace 'other' is not served by this node"),
        b"big": ("RESOURCE_EXHAUSTED", "value of 4.9 KiB is over --max-value-bytes 1000 B"),
        b"": ("INVALID_ARGUMENT", "empty key"),
    }
    assert assembler.stored == 1 and await storage.get(NS, b"fine") == b"y"
    # Larger than the storage: refused at once (zero-copy) or when the batch is written (disk).
    assembler = await assemble(storage, chunks(b"huge", b"h" * (5 * 1024**2), 1024**2))
    assert [(e.key, e.code) for e in assembler.errors] == [(b"huge", "RESOURCE_EXHAUSTED")]
    assert assembler.stored == 0 and await storage.get(NS, b"huge") is None


async def test_a_value_is_readable_only_after_its_last_chunk(storage: Storage) -> None:
    value = os.urandom(1000)
    assembler = ChunkAssembler(storage, batch_items=1)  # store each value as soon as it is whole
    parts = chunks(b"k", value, 300)
    for part in parts[:-1]:
        await assembler.add(part)
        assert await storage.get(NS, b"k") is None and await storage.exists(NS, [b"k"]) == [False]
    await assembler.add(parts[-1])
    assert await storage.get(NS, b"k") == value and assembler.stored == 1


async def test_batched_values_are_stored_by_finish(storage: Storage) -> None:
    assembler = ChunkAssembler(storage)
    for i in range(3):
        for part in chunks(f"k{i}".encode(), b"v" * 100, 64):
            await assembler.add(part)
    await assembler.finish()
    assert assembler.stored == 3 and not assembler.errors
    assert await storage.exists(NS, [b"k0", b"k1", b"k2"]) == [True, True, True]


async def test_abort_leaves_nothing_visible_and_frees_the_space(storage: Storage) -> None:
    await storage.put(NS, b"k", b"old")
    held = storage.stats().used_bytes
    budget = WriteBudget()
    assembler = ChunkAssembler(storage, hold=budget.open("peer"))
    await assembler.add(chunks(b"k", b"n" * 3_000_000, 1_000_000)[0])
    # Bytes not yet arrived reserve nothing in the storage: only what arrived is held.
    assert storage.stats().used_bytes == held and budget.held == 1_000_000
    assembler.abort()
    assembler.abort()
    assert storage.stats().used_bytes == held and budget.held == 0
    assert await storage.get(NS, b"k") == b"old"
    # The freed space is usable again: a value that fits only without the aborted one.
    assert (await assemble(storage, chunks(b"k2", b"m" * 3_000_000, 1_000_000))).stored == 1


async def test_a_failed_batch_fails_each_of_its_keys(tmp_path: Path) -> None:
    disk = await build_storage(f"disk://{tmp_path}/small?capacity=1MiB&sync=false")
    try:
        messages = [*chunks(b"small", b"s" * 10, 10), *chunks(b"huge", b"h" * (2 * 1024**2), 1024**2)]
        assembler = await assemble(disk, messages)
        # Both values went to the disk in one put_many, which refused the batch as a whole.
        assert [(e.key, e.code) for e in assembler.errors] == [
            (b"small", "RESOURCE_EXHAUSTED"), (b"huge", "RESOURCE_EXHAUSTED"),
        ]
        assert assembler.stored == 0 and await disk.exists(NS, [b"small", b"huge"]) == [False, False]
    finally:
        await disk.close()


async def test_capabilities_declare_the_write_path(storage: Storage) -> None:
    write = storage.begin_write(NS, b"w", 4)
    assert (storage.zero_copy() is not None) == storage.capabilities.zero_copy
    with write:
        write.view[:] = b"abcd"
        await write.commit()
    assert write.closed and await storage.get(NS, b"w") == b"abcd"


async def test_a_stalled_value_evicts_nothing_and_holds_only_what_arrived(storage: Storage) -> None:
    for i in range(3):
        await storage.put(NS, f"old{i}".encode(), b"o" * 1_000_000)
    budget = WriteBudget()
    stalled = ChunkAssembler(storage, hold=budget.open("hostile"))
    # Announces a value as large as the storage, sends 4 KiB of it and stalls.
    await stalled.add(PutChunkView(NS, b"big", 4 * 1024**2, 0, memoryview(b"s" * 4096), 0))
    assert budget.held == 4096 and budget.peer_held("hostile") == 4096
    assert await storage.exists(NS, [b"old0", b"old1", b"old2"]) == [True, True, True]
    # Another writer stores meanwhile.
    other = await assemble(storage, chunks(b"other", b"x" * 300_000, 100_000))
    assert other.stored == 1 and not other.errors
    stalled.close()
    assert budget.held == 0 and budget.streams == 0


async def test_the_write_budget_fails_values_past_each_bound(storage: Storage) -> None:
    budget = WriteBudget(WriteBounds(stream_bytes=10_000, peer_bytes=15_000, total_bytes=16_000, peer_streams=2))
    one, two = budget.open("a"), budget.open("a")
    with pytest.raises(ResourceExhausted, match="--max-write-streams-per-peer 2"):
        budget.open("a")
    first = ChunkAssembler(storage, hold=one)
    await first.add(PutChunkView(NS, b"k1", 50_000, 0, memoryview(b"1" * 8_000), 0))
    await first.add(PutChunkView(NS, b"k1", 50_000, 8_000, memoryview(b"1" * 4_000), 0))  # stream: 12,000 > 10,000
    assert [(e.key, e.code) for e in first.errors] == [(b"k1", "RESOURCE_EXHAUSTED")]
    assert "--max-write-stream-bytes" in first.errors[0].message and budget.held == 0
    second = ChunkAssembler(storage, hold=two)
    await first.add(PutChunkView(NS, b"k2", 50_000, 0, memoryview(b"2" * 9_000), 0))
    await second.add(PutChunkView(NS, b"k3", 50_000, 0, memoryview(b"3" * 9_000), 0))  # peer: 18,000 > 15,000
    assert "--max-write-peer-bytes" in second.errors[0].message
    third = ChunkAssembler(storage, hold=budget.open("b"))
    await third.add(PutChunkView(NS, b"k4", 50_000, 0, memoryview(b"4" * 6_000), 0))
    await third.add(PutChunkView(NS, b"k4", 50_000, 6_000, memoryview(b"4" * 2_000), 0))  # total: 17,000
    assert "--max-write-total-bytes" in third.errors[0].message
    for assembler in (first, second, third):
        assembler.close()
    assert budget.held == 0 and budget.streams == 0
