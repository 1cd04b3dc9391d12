"""The `kvmesh.v1.Membership` gRPC service over a `MemberDirectory`.

With a security policy, Register asks the policy (id, role, capacity) and records the caller as
the lease's owner; KeepAlive and Deregister of a lease the caller does not own answer NOT_FOUND
exactly like an unknown lease. List and Watch are open to every authenticated principal
(members' addresses are what routers, engines and clients need; see docs/security.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from opentelemetry.metrics import Observation

from kvmesh.runtime.errors import guard
from kvmesh.services.metadata.authorization import Authorizer
from kvmesh.services.metadata.directory import MemberDirectory, decode_member
from kvmesh.services.metadata.policy import HeartbeatPolicy, LoadThrottle, LoadUpdatePolicy
from kvmesh.services.metadata.stores.base import Entry, LeaseNotFound
from kvmesh.services.metadata.streaming import abort_with, until_closing
from kvmesh.services.metadata.validation import Limits, check_lease, check_member, check_role, check_ttl
from kvmesh.telemetry import meter
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc


class MembershipApi(metadata_pb2_grpc.MembershipServicer):
    """Validates, then delegates to the directory; owns the per-stream heartbeat and load policy."""

    def __init__(
        self,
        directory: MemberDirectory,
        limits: Limits,
        heartbeat: HeartbeatPolicy,
        load_updates: LoadUpdatePolicy,
        authorizer: Authorizer | None = None,
    ) -> None:
        self._directory = directory
        self._authorizer = authorizer or Authorizer()
        self._limits = limits
        self._heartbeat = heartbeat
        self._load_updates = load_updates
        self.keepalive_streams = 0  # this replica's load: heartbeat interval and load rate adapt to it
        self.closing = asyncio.Event()  # set when the replica drains: watch streams end at once
        m = meter("metadata")
        self._registrations = m.create_counter("kvmesh.metadata.registrations", description="Register calls served")
        self._leases_lost = m.create_counter(
            "kvmesh.metadata.keepalive.lease_not_found", description="KeepAlive streams ended: lease unknown/expired")
        self._load_updates_written = m.create_counter(
            "kvmesh.metadata.load_updates", description="load changes written (UPDATE events)")
        self._watches = m.create_up_down_counter("kvmesh.metadata.watch.streams", description="open Watch streams")
        m.create_observable_gauge(
            "kvmesh.metadata.keepalive.streams",
            callbacks=[lambda _options: [Observation(self.keepalive_streams)]],
            description="open KeepAlive streams on this replica",
        )

    def _interval_ms(self, ttl: int) -> int:
        return self._heartbeat.interval_ms(ttl, max(1, self.keepalive_streams))

    @guard
    async def Register(
        self, request: metadata_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.RegisterResponse:
        check_member(request.member, self._limits)
        check_ttl(request.ttl_seconds, self._limits)
        auth = self._authorizer
        auth.check_register(request.member)
        lease_id, ttl, revision = await self._directory.register(
            request.member, request.ttl_seconds, owner=auth.owner(),
            may_replace=auth.may_act_on if auth.enabled else None)
        self._registrations.add(1, {"role": common_pb2.Role.Name(request.member.role)})
        return metadata_pb2.RegisterResponse(
            lease_id=lease_id, ttl_seconds=ttl, heartbeat_interval_ms=self._interval_ms(ttl), revision=revision
        )

    async def KeepAlive(
        self, request_iterator: AsyncIterator[metadata_pb2.KeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[metadata_pb2.KeepAliveResponse]:
        self.keepalive_streams += 1
        lease_id = 0
        entry: Entry | None = None
        throttle: LoadThrottle | None = None
        try:
            async for request in request_iterator:
                check_lease(request.lease_id)
                if request.lease_id != lease_id:  # first message, or the client switched leases
                    lease_id = request.lease_id
                    entry, owner = await self._directory.member_of(lease_id)
                    if self._authorizer.enabled and not self._authorizer.may_act_on(owner):
                        raise LeaseNotFound(lease_id)  # someone else's lease looks unknown
                    throttle = LoadThrottle(self._load_updates, decode_member(entry.key, entry.value).load)
                ttl = await self._directory.refresh(lease_id)
                assert throttle is not None
                if request.HasField("load") and throttle.due(request.load, self.keepalive_streams):
                    entry = await self._directory.update_load(lease_id, entry, request.load)
                    throttle.wrote(request.load)
                    self._load_updates_written.add(1)
                yield metadata_pb2.KeepAliveResponse(
                    lease_id=lease_id, ttl_seconds=ttl, heartbeat_interval_ms=self._interval_ms(ttl)
                )
        except Exception as exc:
            if isinstance(exc, LeaseNotFound):
                self._leases_lost.add(1)
            await abort_with(context, exc)
        finally:
            self.keepalive_streams -= 1

    @guard
    async def Deregister(
        self, request: metadata_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.DeregisterResponse:
        check_lease(request.lease_id)
        if self._authorizer.enabled and not self._authorizer.may_act_on(
                await self._directory.owner_of(request.lease_id)):
            raise LeaseNotFound(request.lease_id)  # someone else's lease looks unknown
        await self._directory.deregister(request.lease_id)
        return metadata_pb2.DeregisterResponse()

    @guard
    async def List(
        self, request: metadata_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.ListResponse:
        check_role(request.role, allow_unspecified=True)
        members, revision, next_token = await self._directory.list(request.role, request.page_token)
        return metadata_pb2.ListResponse(members=members, revision=revision, next_page_token=next_token)

    async def Watch(
        self, request: metadata_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[metadata_pb2.MembershipEvent]:
        self._watches.add(1)
        try:
            check_role(request.role, allow_unspecified=True)
            if request.start_revision < 0:
                raise ValueError(f"start_revision must not be negative, got {request.start_revision}")
            events = self._directory.watch(request.role, request.start_revision)
            async for event in until_closing(events, self.closing):
                yield event
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            self._watches.add(-1)
