"""A malformed --backend is a clear error at startup, not a crash later."""

from __future__ import annotations

import pytest

from kvmesh.tools.testing.ports import free_port
from tests.conftest import KvmeshFactory
from tests.metadata.test_members_cli import finished

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("uri", "code", "message"),
    [
        ("localhost:2379", 2, "not a URI"),
        ("zookeeper://h:1", 2, "unknown metadata backend scheme"),
        ("etcd://h:notaport", 2, "bad port"),
        ("redis://127.0.0.1:6379/notadb", 1, "database number"),
        ("memory://?retain=lots", 1, "retain must be an integer"),
    ],
)
def test_malformed_backend_uri_exits_with_a_clear_message(
    kvmesh: KvmeshFactory, uri: str, code: int, message: str
) -> None:
    proc = kvmesh("metadata", "--listen", f"127.0.0.1:{free_port()}", "--backend", uri, ready=False)
    assert finished(proc) == code, proc.output
    assert message in proc.output
    assert "Traceback" not in proc.output
