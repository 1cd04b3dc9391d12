"""The cache engines' shared contract suite (tests/cachenode/test_engine_contract.py), run on
the fast-path engines: gpu://cpu alone and as L1 of a tier list. (rdma:// runs the same
suite inside its network namespace: netns_rdma_cases.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.cachenode.engines.base import Engine
from services.cachenode.engines.registry import build_engine
from tests.cachenode.test_engine_contract import (  # noqa: F401 - collected here with this module's engine
    test_concurrent_writers_and_readers_never_see_torn_values,
    test_exists_and_batches_keep_order,
    test_overwrite_delete_and_namespaces,
    test_round_trip_of_every_size,
    test_ttl_expires,
)

URIS = {
    "gpu-cpu": "gpu://cpu?capacity=64MiB&staging=1MiB&staging_buffers=2",
    "gpu-cpu-over-memory": "gpu://cpu?capacity=8MiB&write=back,memory://?capacity=64MiB",
}


@pytest.fixture(params=sorted(URIS))
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    built = await build_engine(URIS[request.param])
    try:
        yield built
    finally:
        await built.close()
