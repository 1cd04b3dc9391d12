"""Keeps one member registered with the metadata service.

Register, then a KeepAlive stream whose interval the server sets. When the replica in use
dies, the same lease is kept alive through the next replica (the lease lives in the shared
backend); when the lease is gone (NOT_FOUND), the member registers again. Retries use
full-jitter backoff, so a restarted metadata service is not stampeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from kvmesh.backoff import Backoff
from kvmesh.runtime.channels import open_channel
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc

log = logging.getLogger("kvmesh.membership")

LoadFn = Callable[[], common_pb2.Load]


class MemberSession:
    """Registers `member` and renews its lease until `close()`; re-registers by itself."""

    def __init__(
        self,
        metadata_addresses: Sequence[str],
        member: common_pb2.Member,
        ttl_seconds: int = 10,
        load_fn: LoadFn | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if not metadata_addresses:
            raise ValueError("at least one metadata address is needed")
        self._addresses = list(metadata_addresses)
        self._member = member
        self._ttl = ttl_seconds
        self._load_fn = load_fn
        self._backoff = backoff or Backoff(base_s=0.1, cap_s=2.0)
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._closing = asyncio.Event()
        self._wake = asyncio.Event()
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self.lease_id = 0
        self.heartbeat_interval_s = 1.0
        self.registrations = 0

    @property
    def member(self) -> common_pb2.Member:
        return self._member

    async def start(self) -> None:
        """Starts the background loop (safe to call twice)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"member-session-{self._member.id}")

    async def wait_registered(self, timeout: float | None = None) -> int:
        """Waits until a lease is held; returns its id."""
        await asyncio.wait_for(self._registered.wait(), timeout)
        return self.lease_id

    def nudge(self) -> None:
        """Sends the next heartbeat now (for example when load changed a lot)."""
        self._wake.set()

    async def close(self, deregister: bool = True) -> None:
        """Stops heartbeating; with `deregister`, the member leaves at once."""
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if deregister and self.lease_id and self._channel is not None:
            stub = metadata_pb2_grpc.MembershipStub(self._channel)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                await stub.Deregister(metadata_pb2.DeregisterRequest(lease_id=self.lease_id), timeout=2.0)
        self.lease_id = 0
        self._registered.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _connect(self) -> metadata_pb2_grpc.MembershipStub:
        if self._channel is None:
            self._channel = open_channel(self._addresses[self._index % len(self._addresses)])
        return metadata_pb2_grpc.MembershipStub(self._channel)

    async def _next_replica(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._index += 1

    def _response_deadline_s(self) -> float:
        """How long to wait for a heartbeat's answer before trying another replica."""
        return self.heartbeat_interval_s + max(1.0, self._ttl / 3)

    def _load(self) -> common_pb2.Load:
        if self._load_fn is None:
            return common_pb2.Load()
        try:
            return self._load_fn()
        except Exception:
            log.warning("load callback failed", exc_info=True)
            return common_pb2.Load()

    async def _heartbeats(self, lease_id: int) -> AsyncIterator[metadata_pb2.KeepAliveRequest]:
        while not self._closing.is_set():
            yield metadata_pb2.KeepAliveRequest(lease_id=lease_id, load=self._load())
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_interval_s)

    async def _register(self, stub: metadata_pb2_grpc.MembershipStub) -> None:
        member = common_pb2.Member()
        member.CopyFrom(self._member)
        member.load.CopyFrom(self._load())
        resp = await stub.Register(metadata_pb2.RegisterRequest(member=member, ttl_seconds=self._ttl), timeout=5.0)
        self.lease_id = resp.lease_id
        self.heartbeat_interval_s = max(0.05, resp.heartbeat_interval_ms / 1000.0)
        self.registrations += 1
        self._registered.set()
        log.info("registered", extra={"member": self._member.id, "lease": resp.lease_id})

    async def _run(self) -> None:
        attempt = 0
        while not self._closing.is_set():
            stub = self._connect()
            try:
                if not self.lease_id:
                    await self._register(stub)
                call = stub.KeepAlive(self._heartbeats(self.lease_id))
                while True:
                    # A replica that hangs (stopped, partitioned) keeps the connection open;
                    # without this deadline the lease would lapse long before gRPC's pings notice.
                    try:
                        resp = await asyncio.wait_for(call.read(), self._response_deadline_s())
                    except TimeoutError:
                        call.cancel()
                        raise grpc.aio.AioRpcError(
                            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                            "metadata replica stopped answering heartbeats",
                        ) from None
                    if resp is grpc.aio.EOF:
                        break  # the server ended the stream cleanly: keep the lease, open a new stream
                    attempt = 0
                    if resp.heartbeat_interval_ms:
                        self.heartbeat_interval_s = max(0.05, resp.heartbeat_interval_ms / 1000.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.info("lease lost; registering again", extra={"member": self._member.id})
                    self.lease_id = 0
                    self._registered.clear()
                    continue
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("registration refused: %s", exc.details())
                else:
                    log.debug("metadata replica unreachable (%s); trying the next", exc.code())
                await self._next_replica()
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
