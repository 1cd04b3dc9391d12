"""The cache storages' shared contract suite (tests/cachenode/test_storage_contract.py), run on
the fast-path storages: gpu://cpu alone and as L1 of a tier list. (rdma:// runs the same
suite inside its network namespace: netns_rdma_cases.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.storage.registry import build_storage
from tests.cachenode.test_storage_contract import (  # noqa: F401 - collected here with this module's storage
    test_concurrent_writers_and_readers_never_see_torn_values,
    test_exists_and_batches_keep_order,
    test_namespaces_never_collide,
    test_overwrite_delete_and_namespaces,
    test_round_trip_of_every_size,
    test_ttl_expires,
)

URIS = {
    "gpu-cpu": "gpu://cpu?capacity=64MiB&staging=1MiB&staging_buffers=2",
    "gpu-cpu-over-memory": "gpu://cpu?capacity=8MiB&write=back,memory://?capacity=64MiB",
}


@pytest.fixture(params=sorted(URIS))
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    built = await build_storage(URIS[request.param])
    try:
        yield built
    finally:
        await built.close()


async def test_one_write_api_on_the_fast_path_storages(storage: Storage) -> None:
    """gpu:// declares no zero-copy surface, so its writes are buffered and committed with put."""
    assert not storage.capabilities.zero_copy and storage.zero_copy() is None
    with storage.begin_write("ns", b"w", 6) as write:
        write.write(0, b"abc")
        assert await storage.get("ns", b"w") is None
        write.view[3:] = b"def"
        await write.commit()
    assert await storage.get("ns", b"w") == b"abcdef"
    with storage.begin_write("ns", b"dropped", 3) as dropped:
        dropped.write(0, b"xyz")
    assert dropped.closed and await storage.get("ns", b"dropped") is None
