"""Property-based fuzzing of every RPC's request messages against running services (real
`kvmesh` processes: metadata, a cache node, a router): no call gets UNKNOWN, INTERNAL or
DATA_LOSS, no process dies, and each keeps answering its health check SERVING. Bounded: a
few dozen examples per RPC (KVMESH_FUZZ_EXAMPLES raises it for a longer local run)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.fuzz import CLIENT_ERRORS, call_method, message_strategy
from kvmesh.tools.testing.mesh import reap
from kvmesh.v1 import cachenode_pb2, metadata_pb2, router_pb2

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("KVMESH_FUZZ_EXAMPLES", "25"))
SERVICES = {
    "kvmesh.v1.Membership": ("metadata", metadata_pb2),
    "kvmesh.v1.Metadata": ("metadata", metadata_pb2),
    "kvmesh.v1.KVCache": ("cachenode", cachenode_pb2),
    "kvmesh.v1.Router": ("router", router_pb2),
}
METHODS: list[MethodDescriptor] = [
    method
    for name, (_, module) in SERVICES.items()
    for method in module.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]].methods
]


class Running:
    """The services under test, started once for the module."""

    def __init__(self) -> None:
        self.processes: dict[str, KvmeshProcess] = {}
        self.channels: dict[str, grpc.Channel] = {}

    def start(self) -> None:
        md = KvmeshProcess(["metadata", "--listen", "127.0.0.1:0", "--backend", "memory://?sweep_ms=50"],
                           name="metadata")
        self.processes["metadata"] = md
        address = md.wait_ready(30)
        for role, args in (
            ("cachenode", ["cachenode", "--storage", "memory://?capacity=64MiB", "--write-idle-timeout-seconds", "2"]),
            ("router", ["router"]),
        ):
            proc = KvmeshProcess([*args, "--listen", "127.0.0.1:0", "--metadata", address], name=role)
            self.processes[role] = proc
            proc.wait_ready(30)
        for role, proc in self.processes.items():
            assert proc.address is not None
            self.channels[role] = grpc.insecure_channel(proc.address)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        for proc in self.processes.values():
            proc.send_term()
        for proc in self.processes.values():
            proc.wait(15)
        reap(self.processes.values())

    def check_alive(self) -> None:
        for role, proc in self.processes.items():
            assert proc.running(), f"{role} died:\n{proc.tail(40)}"
            health = health_pb2_grpc.HealthStub(self.channels[role]).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, role


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    services = Running()
    try:
        services.start()
        yield services
    finally:
        services.close()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_fuzzed_requests_get_client_errors_only(running: Running, method: MethodDescriptor) -> None:
    role = SERVICES[method.containing_service.full_name][0]
    channel = running.channels[role]
    requests = st.lists(message_strategy(method.input_type), min_size=1, max_size=3)
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests)
    def one(batch: list[Message]) -> None:
        code = call_method(channel, method, batch)
        seen[code] = seen.get(code, 0) + 1
        assert code in CLIENT_ERRORS, f"{method.full_name} answered {code} to {batch[0]!r:.300}"

    one()
    running.check_alive()
    assert sum(seen.values()) >= 1
