"""A cache node with a policy, as a real process: who may read, write and delete which namespace,
over gRPC and over the bulk data plane (TLS from the service's own --tls-* files), and tenants
that share a prompt but never a block."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import StatusCode as Code

from kvmesh import control_wire as cw
from kvmesh import frames
from kvmesh.client.cache import CacheClient, NodeInfo
from kvmesh.client.control import SocketControl
from kvmesh.client.dataplane import MISS, DataPlaneConnecting, DataPlanePool, DataPlaneRefused, DataPlaneUnavailable
from kvmesh.runtime.channels import open_channel
from kvmesh.security.identity import token_digest
from kvmesh.security.tls import ClientTLS, TLSFiles, client_ssl_context
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.status import status_of
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc
from tests.security.conftest import Pki

pytestmark = pytest.mark.integration

TOKEN_A = "tenant-a-3f9c1d27e8"
TOKEN_B = "tenant-b-b71e04aa5c"
TOKEN_OPS = "ops-0c5e9b2f7a"
A, B = "tenant-a", "tenant-b"


def write_policy(path: Path) -> Path:
    path.write_text(json.dumps({"principals": {
        A: {"tokens_sha256": [token_digest(TOKEN_A)], "namespaces": {"read": ["self"], "write": ["self"]}},
        B: {"tokens_sha256": [token_digest(TOKEN_B)], "namespaces": {"read": ["self"], "write": ["self"]}},
        "ops": {"tokens_sha256": [token_digest(TOKEN_OPS)], "admin": True},
        "cert-a": {"namespaces": {"read": [A], "write": [A]}},
    }}))
    return path


@contextlib.asynccontextmanager
async def secured_node(pki: Pki, tmp_path: Path, require_client_cert: bool = False,
                       storage: str = "memory://?capacity=64MiB",
                       **extra: Any) -> AsyncIterator[tuple[MeshHandle, str, str]]:
    """One standalone cache node process with TLS and the policy; yields (mesh, gRPC address, data endpoint)."""
    settings = pki.server_flags(pki.issue("cachenode-0"), require_client_cert=require_client_cert,
                                security_policy=write_policy(tmp_path / "policy.json"), storage=storage, **extra)
    async with process_mesh(metadata=0, cachenodes=1, cachenode_settings=settings, timeout=110) as mesh:
        member = mesh.of_role("cachenode")[0]
        assert member.process is not None
        yield mesh, member.address, member.process.ready["data_endpoint"]


def token_tls(pki: Pki, token: str | None) -> ClientTLS:
    return ClientTLS(TLSFiles(tls_ca=pki.ca.cert_path), (lambda: token) if token else None)



class Caller:
    """The KVCache calls of one principal (or of nobody)."""

    def __init__(self, address: str, tls: ClientTLS) -> None:
        self.channel = open_channel(address, tls=tls)
        self.stub = cachenode_pb2_grpc.KVCacheStub(self.channel)

    async def put(self, ns: str, key: bytes, value: bytes) -> Code:
        return await status_of(self.stub.Put(cachenode_pb2.PutRequest(namespace=ns, key=key, value=value), timeout=10))

    async def get(self, ns: str, key: bytes) -> tuple[Code, bytes | None]:
        try:
            reply = await self.stub.Get(cachenode_pb2.GetRequest(namespace=ns, key=key), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), None
        return Code.OK, reply.value if reply.found else None

    async def delete(self, ns: str, key: bytes) -> Code:
        return await status_of(self.stub.Delete(cachenode_pb2.DeleteRequest(namespace=ns, key=key), timeout=10))

    async def exists(self, ns: str, key: bytes) -> Code:
        return await status_of(self.stub.Exists(cachenode_pb2.ExistsRequest(namespace=ns, keys=[key]), timeout=10))

    async def batch_get(self, ns: str, key: bytes) -> Code:
        async def drain() -> None:
            async for _ in self.stub.BatchGet(cachenode_pb2.BatchGetRequest(namespace=ns, keys=[key]), timeout=10):
                pass
        return await status_of(drain())

    async def batch_put(self, items: list[tuple[str, bytes, bytes]]) -> Code:
        chunks = [cachenode_pb2.PutChunk(namespace=ns, key=k, total_size=len(v), data=v) for ns, k, v in items]
        return await status_of(self.stub.BatchPut(iter(chunks), timeout=10))

    async def stats(self) -> Code:
        return await status_of(self.stub.Stats(cachenode_pb2.StatsRequest(), timeout=10))

    async def close(self) -> None:
        await self.channel.close()


@contextlib.asynccontextmanager
async def callers(address: str, **tls: ClientTLS) -> AsyncIterator[dict[str, Caller]]:
    out = {name: Caller(address, t) for name, t in tls.items()}
    try:
        yield out
    finally:
        for caller in out.values():
            await caller.close()


async def test_grpc_calls_need_credentials_and_the_namespace(pki: Pki, tmp_path: Path) -> None:
    async with secured_node(pki, tmp_path) as (_, address, _), callers(
        address, a=token_tls(pki, TOKEN_A), b=token_tls(pki, TOKEN_B), ops=token_tls(pki, TOKEN_OPS),
        nobody=token_tls(pki, None), forged=token_tls(pki, "tenant-a-guess"),
    ) as c:
        assert await c["a"].put(A, b"block", b"tenant a's KV") == Code.OK
        # Anonymous and forged callers: every call that touches blocks is UNAUTHENTICATED.
        for who in ("nobody", "forged"):
            assert await c[who].get(A, b"block") == (Code.UNAUTHENTICATED, None)
            assert await c[who].put(A, b"block", b"poisoned") == Code.UNAUTHENTICATED
            assert await c[who].delete(A, b"block") == Code.UNAUTHENTICATED
            assert await c[who].exists(A, b"block") == Code.UNAUTHENTICATED
            assert await c[who].batch_get(A, b"block") == Code.UNAUTHENTICATED
            assert await c[who].batch_put([(A, b"block", b"poisoned")]) == Code.UNAUTHENTICATED
            assert await c[who].stats() == Code.UNAUTHENTICATED
        # Tenant b in tenant a's namespace: every read, write and delete is PERMISSION_DENIED.
        assert await c["b"].get(A, b"block") == (Code.PERMISSION_DENIED, None)
        assert await c["b"].exists(A, b"block") == Code.PERMISSION_DENIED
        assert await c["b"].batch_get(A, b"block") == Code.PERMISSION_DENIED
        assert await c["b"].put(A, b"block", b"poisoned") == Code.PERMISSION_DENIED
        assert await c["b"].batch_put([(A, b"block", b"poisoned")]) == Code.PERMISSION_DENIED
        assert await c["b"].delete(A, b"block") == Code.PERMISSION_DENIED
        # A stream that starts in b's own namespace and then turns to a's is cut at a's value.
        assert await c["b"].batch_put([(B, b"mine", b"b's"), (A, b"block", b"poisoned"),
                                       (B, b"after", b"b's")]) == Code.PERMISSION_DENIED
        assert await c["b"].get(B, b"after") == (Code.OK, None)
        # Nothing changed: tenant a (and the admin) still read a's own bytes.
        assert await c["a"].get(A, b"block") == (Code.OK, b"tenant a's KV")
        assert await c["ops"].get(A, b"block") == (Code.OK, b"tenant a's KV")
        assert await c["a"].get(B, b"mine") == (Code.PERMISSION_DENIED, None)
        # Each tenant works in its own namespace; Stats (node-wide counters only) answers anyone authenticated.
        assert await c["b"].put(B, b"block", b"tenant b's KV") == Code.OK
        assert await c["b"].get(B, b"block") == (Code.OK, b"tenant b's KV")
        assert await c["b"].stats() == Code.OK
        assert await c["a"].delete(A, b"block") == Code.OK
        assert await c["a"].get(A, b"block") == (Code.OK, None)


def data_pool(pki: Pki, endpoint: str, token: str | None = None, issued: Any = None) -> DataPlanePool:
    files = TLSFiles(tls_ca=pki.ca.cert_path, tls_cert=issued.cert if issued else None,
                     tls_key=issued.key if issued else None)
    return DataPlanePool(endpoint, ssl_context=client_ssl_context(files), token=(lambda: token) if token else None)


@contextlib.asynccontextmanager
async def pools(*made: DataPlanePool) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for pool in made:
            await pool.close()


async def settled(call: Callable[[], Awaitable[Any]]) -> Any:
    """`call()`, again while the pool is still making its connection (nothing was sent then)."""
    for _ in range(60):
        try:
            return await call()
        except DataPlaneConnecting:
            await asyncio.sleep(0.25)
    raise AssertionError("the data-plane connection was never made")


async def refused(call: Callable[[], Awaitable[Any]]) -> int:
    with pytest.raises(DataPlaneRefused) as info:
        await settled(call)
    return info.value.status


async def test_data_plane_over_tls_with_tokens(pki: Pki, tmp_path: Path) -> None:
    async with secured_node(pki, tmp_path) as (_, address, endpoint):
        a, b = data_pool(pki, endpoint, TOKEN_A), data_pool(pki, endpoint, TOKEN_B)
        anonymous, forged = data_pool(pki, endpoint), data_pool(pki, endpoint, "tenant-a-guess")
        async with pools(a, b, anonymous, forged):
            value = b"tenant a's block" * 4096
            assert await settled(lambda: a.put(A, [b"block"], [memoryview(value)])) == b"\x00"
            assert await a.get(A, [b"block", b"none"]) == [value, None]
            # No credentials: a clear UNAUTHENTICATED error frame, then the node closes the connection.
            assert await refused(lambda: anonymous.get(A, [b"block"])) == frames.Status.UNAUTHENTICATED
            assert await refused(lambda: anonymous.put(A, [b"block"], [memoryview(b"poison")])) == \
                frames.Status.UNAUTHENTICATED
            # An unknown token is refused at connection start (the client library then uses gRPC).
            with pytest.raises(DataPlaneUnavailable):
                await settled(lambda: forged.get(A, [b"block"]))
            # Another tenant: PERMISSION_DENIED per request, and its connection goes on.
            for request in (lambda: b.get(A, [b"block"]), lambda: b.exists(A, [b"block"]),
                            lambda: b.delete(A, [b"block"]), lambda: b.put(A, [b"block"], [memoryview(b"poisoned")])):
                assert await refused(request) == frames.Status.PERMISSION_DENIED
            assert await b.put(B, [b"block"], [memoryview(b"b's own")]) == b"\x00"
            assert await b.get(B, [b"block"]) == [b"b's own"]
            assert await a.get(A, [b"block"]) == [value]  # unchanged
        # Plaintext to the TLS data port: no frame is answered, and the node keeps serving.
        host, _, port = endpoint.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(frames.encode_request(frames.Op.GET, 1, A, [b"block"]))
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                reply = await reader.read(1 << 16)
            assert not reply.startswith(frames.MAGIC)
        writer.close()
        again = data_pool(pki, endpoint, TOKEN_A)
        async with pools(again):
            assert await settled(lambda: again.get(A, [b"block"])) == [value]
        # The client library presents the token on both planes and reads over the data plane.
        infos = [NodeInfo("n0", address, data_endpoint=endpoint)]
        async with await CacheClient.from_nodes(infos, namespace=A, local="never",
                                                tls=token_tls(pki, TOKEN_A)) as client:
            assert await client.get(b"block") == value
            data = client._nodes["n0"].data
            assert data is not None
            await eventually(lambda: data.connected, timeout=10, what="the data-plane connection with a token")
            out = bytearray(len(value))
            assert await client.get_into(b"block", out) == len(value) and out == value
            assert client._nodes["n0"].data_down_until == 0


async def test_tenants_share_a_prompt_never_a_block(pki: Pki, tmp_path: Path) -> None:
    """Over mutual TLS, identities from certificates: the same prompt gives each tenant its own
    block keys (the namespace is hashed into them), and the other tenant's namespace is refused on
    both planes, so tenant b never reads tenant a's KV."""
    async with secured_node(pki, tmp_path, require_client_cert=True) as (_, address, endpoint):
        cert_a, cert_b = pki.issue("cert-a"), pki.issue("cert-b")
        infos = [NodeInfo("n0", address, data_endpoint=endpoint)]
        tokens = list(range(64))
        blocks = [f"a's KV of block {i}".encode() for i in range(4)]
        async with await CacheClient.from_nodes(infos, namespace=A, local="never", tls=pki.client(cert_a)) as ca:
            assert await ca.put_token_blocks(tokens, blocks) == 4
            assert await ca.get_token_blocks(tokens) == blocks
            keys_a = ca.keys_for_tokens(tokens)
        # cert-b holds no grant at all; as tenant b (token) it has its own namespace only.
        b_tls = ClientTLS(TLSFiles(tls_ca=pki.ca.cert_path, tls_cert=cert_b.cert, tls_key=cert_b.key),
                          lambda: TOKEN_B)
        async with await CacheClient.from_nodes(infos, namespace=B, local="never", tls=b_tls) as cb:
            assert cb.keys_for_tokens(tokens) != keys_a
            assert await cb.get_token_blocks(tokens) == []
        async with await CacheClient.from_nodes(infos, namespace=A, local="never", tls=b_tls) as spy:
            assert spy.keys_for_tokens(tokens) == keys_a  # even claiming a's namespace and keys...
            assert await spy.get_many(keys_a) == [None] * 4  # ...nothing comes back
            assert await spy.batch_get_into(keys_a[:1], [bytearray(64)]) == [MISS]
            assert await spy.put_many([(keys_a[0], b"poisoned")]) == 0
        async with callers(address, b=b_tls) as c:
            assert await c["b"].get(A, keys_a[0]) == (Code.PERMISSION_DENIED, None)
        a_pool, b_pool = data_pool(pki, endpoint, issued=cert_a), data_pool(pki, endpoint, issued=cert_b)
        async with pools(a_pool, b_pool):
            assert await settled(lambda: a_pool.get(A, keys_a)) == blocks  # the certificate's identity
            # cert-b is authenticated (mutual TLS) but granted nothing; cert-a only its namespace.
            assert await refused(lambda: b_pool.get(A, keys_a)) == frames.Status.PERMISSION_DENIED
            assert await refused(lambda: a_pool.get(B, keys_a)) == frames.Status.PERMISSION_DENIED


async def test_zero_copy_attach_needs_every_namespace(pki: Pki, tmp_path: Path) -> None:
    """An attached client maps the node's whole arena: a tenant may not attach, an admin may, and
    a session's calls come only from the principal that attached it."""
    async with secured_node(pki, tmp_path, storage="memory://?capacity=16MiB&arena=shm",
                            namespace_quotas="small=1KiB") as (
            _, address, endpoint), open_channel(address, tls=token_tls(pki, TOKEN_A)) as tenant, \
                open_channel(address, tls=token_tls(pki, TOKEN_OPS)) as admin:
        request = cachenode_pb2.AttachRequest(client_id="t", transport=cachenode_pb2.TRANSPORT_SHM)

        async def first(call: Any) -> cachenode_pb2.AttachResponse:
            async for reply in call:
                return reply
            raise AssertionError("no AttachResponse")

        denied = cachenode_pb2_grpc.KVCacheStub(tenant).Attach(request, timeout=30)
        assert await status_of(first(denied)) == Code.PERMISSION_DENIED
        session = cachenode_pb2_grpc.KVCacheStub(admin).Attach(request, timeout=30)  # open while used
        attached = await first(session)
        assert attached.session_id and len(attached.session_id) == 32  # 128 random bits
        allocate = cachenode_pb2.AllocateRequest(session_id=attached.session_id, namespace=A, key=b"k", size=8)
        stub = cachenode_pb2_grpc.KVCacheStub(tenant)
        assert await status_of(stub.Allocate(allocate, timeout=10)) == Code.PERMISSION_DENIED
        assert await status_of(cachenode_pb2_grpc.KVCacheStub(admin).Allocate(allocate, timeout=10)) == Code.OK
        # Allocations are charged to the namespace's quota like every other write.
        too_big = cachenode_pb2.AllocateRequest(session_id=attached.session_id, namespace="small", key=b"k", size=2048)
        assert await status_of(cachenode_pb2_grpc.KVCacheStub(admin).Allocate(too_big, timeout=10)) == \
            Code.RESOURCE_EXHAUSTED
        # The local control socket: this user (the node's) binds the session with its id...
        assert attached.control_socket
        control = await SocketControl.connect(attached.control_socket, attached.session_id, 10)
        control.close()
        # ...another local user is refused before its HELLO, even with the live session id (run
        # as nobody with the system Python: this one may sit under a home nobody can read).
        if os.geteuid() == 0 and shutil.which("python3", path="/usr/bin:/bin"):
            assert await other_user_hello(attached.control_socket, attached.session_id) == (
                cw.ERROR, Code.PERMISSION_DENIED.value[0])
        session.cancel()
        # A tenant's client library on the same host is refused the shared memory once, then uses
        # the data plane (and asks no more).
        infos = [NodeInfo("n0", address, data_endpoint=endpoint)]
        async with await CacheClient.from_nodes(infos, namespace=A, local="auto",
                                                tls=token_tls(pki, TOKEN_A)) as client:
            assert await client.put(b"k", b"tenant a's") and await client.get(b"k") == b"tenant a's"
            assert "n0" in client._local._unavailable


OTHER_USER_HELLO = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect("\\0" + sys.argv[1][1:])
session = sys.argv[2].encode()
try:
    sock.sendall(struct.pack("<IB", len(session), 1) + session)
except OSError:
    pass  # refused and closed before the HELLO: the answer is still there to read
head = b""
while len(head) < 5:
    part = sock.recv(5 - len(head))
    if not part:
        break
    head += part
length, kind = struct.unpack("<IB", head) if len(head) == 5 else (0, -1)
code = sock.recv(1) if length else b""
print(kind, code[0] if code else -1)
"""


async def other_user_hello(address: str, session_id: str) -> tuple[int, int]:
    """A HELLO from another local user (nobody), in a child process: (answer kind, status code)."""
    # setpriv changes the user after exec: with `user=` Python would fork this process (grpc's
    # threads and fork handlers included) and the child sometimes crashed before its exec.
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", OTHER_USER_HELLO,
        address, session_id, stdout=asyncio.subprocess.PIPE, cwd="/")
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    kind, code = out.split()
    return int(kind), int(code)


