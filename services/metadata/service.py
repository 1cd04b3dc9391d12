"""The metadata service: Membership and Metadata gRPC APIs over one store backend."""

from __future__ import annotations

import logging

import grpc

from kvmesh.runtime.errors import Unavailable
from kvmesh.runtime.server import Service
from kvmesh.services.metadata.authorization import Authorizer
from kvmesh.services.metadata.directory import MemberDirectory
from kvmesh.services.metadata.keyvalue_api import KeyValueApi
from kvmesh.services.metadata.membership_api import MembershipApi
from kvmesh.services.metadata.policy import HeartbeatPolicy, LoadUpdatePolicy
from kvmesh.services.metadata.settings import MetadataSettings
from kvmesh.services.metadata.stores.base import Store, StoreHandle
from kvmesh.services.metadata.stores.registry import open_store
from kvmesh.services.metadata.validation import Limits
from kvmesh.v1 import metadata_pb2_grpc

log = logging.getLogger("kvmesh.metadata")


class MetadataService(Service):
    """Stateless over etcd/Redis: every replica serves every member from the shared store."""

    name = "metadata"
    service_names = ("kvmesh.v1.Membership", "kvmesh.v1.Metadata")

    def __init__(self, settings: MetadataSettings, store: Store | None = None) -> None:
        self.settings = settings
        self._given_store = store
        self.handle = StoreHandle()
        limits = Limits(
            max_id_bytes=settings.max_id_bytes,
            max_key_bytes=settings.max_key_bytes,
            max_value_bytes=settings.max_value_bytes,
            max_ttl_seconds=settings.max_ttl_seconds,
            max_member_bytes=settings.max_member_bytes,
            max_labels=settings.max_labels,
            max_label_bytes=settings.max_label_bytes,
            snapshot_page_bytes=min(settings.snapshot_page_bytes, settings.max_message_bytes // 2),
        )
        authorizer = Authorizer.from_file(settings.security_policy)
        self.membership = MembershipApi(
            MemberDirectory(self.handle, limits.snapshot_page_bytes),
            limits,
            HeartbeatPolicy(max_per_second=settings.max_heartbeats_per_second),
            LoadUpdatePolicy(
                min_interval_s=settings.load_update_interval_ms / 1000.0,
                max_per_second=settings.max_load_updates_per_second,
            ),
            authorizer,
        )
        self.keyvalue = KeyValueApi(self.handle, limits, MemberDirectory(self.handle), authorizer)
        self._store: Store | None = None

    def register(self, server: grpc.aio.Server) -> None:
        metadata_pb2_grpc.add_MembershipServicer_to_server(self.membership, server)
        metadata_pb2_grpc.add_MetadataServicer_to_server(self.keyvalue, server)

    async def start(self, address: str) -> None:
        if self._store is not None:
            return
        store = self._given_store or await open_store(self.settings.backend)
        await store.start()
        self._store = store
        self.handle.set(store)
        try:
            await store.ping()
        except Unavailable as exc:
            log.warning("backend not reachable yet (%s); answering UNAVAILABLE until it is", exc)
        log.info("metadata backend open", extra={"backend": self.settings.backend})

    async def drain(self) -> None:
        """Ends watch streams now, so watchers resume on another replica instead of waiting out the grace."""
        self.membership.closing.set()
        self.keyvalue.closing.set()

    async def close(self) -> None:
        store, self._store = self._store, None
        self.handle.set(None)
        if store is not None:
            await store.close()
