"""The `kvmesh.v1.Metadata` gRPC service: a small KV for mesh-wide settings and locks.

User keys live under `kv/` in the store, apart from membership's own keys. A watch
starts at the current revision (start_revision 0) or replays the events after
`start_revision`; when those are no longer retained it ends with OUT_OF_RANGE, and the
client reads the current state with Range and watches from the revision Range returned
(etcd's model).

With a security policy each key is checked with the policy's metadata prefixes: Get needs read,
Put and Delete write, CompareAndSwap both (it reads the current value). Range and Watch return
only the keys the caller may read (the others are left out, not refused). `Put(lease_id=X)` needs
the caller to own lease X; a lease it does not own answers NOT_FOUND exactly like an unknown one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from kvmesh.runtime.errors import KvmeshError, guard
from kvmesh.services.metadata.authorization import Authorizer
from kvmesh.services.metadata.directory import MemberDirectory
from kvmesh.services.metadata.stores.base import Change, Compacted, Entry, LeaseNotFound, Store, StoreHandle
from kvmesh.services.metadata.streaming import abort_with, until_closing
from kvmesh.services.metadata.validation import Limits, check_key, check_lease, check_prefix, check_value
from kvmesh.v1 import metadata_pb2, metadata_pb2_grpc

KV = "kv/"


class OutOfRange(KvmeshError):
    code = grpc.StatusCode.OUT_OF_RANGE


def _kv(entry: Entry) -> metadata_pb2.KeyValue:
    return metadata_pb2.KeyValue(
        key=entry.key[len(KV) :], value=entry.value, mod_revision=entry.mod_revision, lease_id=entry.lease_id
    )


def _event(change: Change) -> metadata_pb2.KeyEvent:
    kind = metadata_pb2.KEY_PUT if change.kind == "put" else metadata_pb2.KEY_DELETE
    kv = metadata_pb2.KeyValue(key=change.key[len(KV) :], value=change.value, lease_id=change.lease_id)
    if change.kind == "put":
        kv.mod_revision = change.revision
    return metadata_pb2.KeyEvent(type=kind, kv=kv, revision=change.revision)


class KeyValueApi(metadata_pb2_grpc.MetadataServicer):
    """Validates, then maps each call to one store operation under the `kv/` namespace."""

    def __init__(self, handle: StoreHandle, limits: Limits, directory: MemberDirectory | None = None,
                 authorizer: Authorizer | None = None) -> None:
        self._handle = handle
        self._limits = limits
        self._directory = directory or MemberDirectory(handle)
        self._authorizer = authorizer or Authorizer()
        self.closing = asyncio.Event()  # set when the replica drains: watch streams end at once

    @property
    def _store(self) -> Store:
        return self._handle.store

    @guard
    async def Get(self, request: metadata_pb2.GetKeyRequest, context: grpc.aio.ServicerContext
                  ) -> metadata_pb2.GetKeyResponse:
        check_key(request.key, self._limits)
        self._authorizer.check_key(request.key, write=False)
        entry = await self._store.get(KV + request.key)
        if entry is None:
            return metadata_pb2.GetKeyResponse(found=False)
        return metadata_pb2.GetKeyResponse(found=True, value=entry.value, mod_revision=entry.mod_revision)

    @guard
    async def Put(self, request: metadata_pb2.PutKeyRequest, context: grpc.aio.ServicerContext
                  ) -> metadata_pb2.PutKeyResponse:
        check_key(request.key, self._limits)
        check_value(request.value, self._limits)
        self._authorizer.check_key(request.key, write=True)
        if request.lease_id:
            check_lease(request.lease_id)
            if self._authorizer.enabled and not self._authorizer.may_act_on(
                    await self._directory.owner_of(request.lease_id)):
                raise LeaseNotFound(request.lease_id)  # someone else's lease looks unknown
        revision = await self._store.put(KV + request.key, request.value, request.lease_id)
        return metadata_pb2.PutKeyResponse(revision=revision)

    @guard
    async def Delete(self, request: metadata_pb2.DeleteKeyRequest, context: grpc.aio.ServicerContext
                     ) -> metadata_pb2.DeleteKeyResponse:
        check_key(request.key, self._limits)
        self._authorizer.check_key(request.key, write=True)
        deleted, revision = await self._store.delete(KV + request.key)
        return metadata_pb2.DeleteKeyResponse(deleted=deleted, revision=revision)

    @guard
    async def Range(self, request: metadata_pb2.RangeRequest, context: grpc.aio.ServicerContext
                    ) -> metadata_pb2.RangeResponse:
        check_prefix(request.prefix, self._limits)
        if request.start_after:
            check_key(request.start_after, self._limits)
        start = KV + request.start_after if request.start_after else ""
        filtered = self._authorizer.enabled  # unreadable keys are left out, so the limit comes after
        entries, revision = await self._store.range(KV + request.prefix, 0 if start or filtered else request.limit)
        if filtered:
            entries = [e for e in entries if self._authorizer.readable(e.key[len(KV) :])]
        if start or filtered:
            entries = [e for e in entries if e.key > start]
            if request.limit:
                entries = entries[: request.limit]
        kvs: list[metadata_pb2.KeyValue] = []
        size = 0
        for entry in entries:  # no answer outgrows a message: the rest comes with start_after
            kv = _kv(entry)
            size += kv.ByteSize() + 8
            if kvs and size > self._limits.snapshot_page_bytes:
                return metadata_pb2.RangeResponse(kvs=kvs, revision=revision, more=True)
            kvs.append(kv)
        return metadata_pb2.RangeResponse(kvs=kvs, revision=revision)

    @guard
    async def CompareAndSwap(
        self, request: metadata_pb2.CompareAndSwapRequest, context: grpc.aio.ServicerContext
    ) -> metadata_pb2.CompareAndSwapResponse:
        check_key(request.key, self._limits)
        check_value(request.value, self._limits)
        if request.expected_mod_revision < 0:
            raise ValueError("expected_mod_revision must not be negative")
        self._authorizer.check_key(request.key, write=False)  # a failed swap returns the value
        self._authorizer.check_key(request.key, write=True)
        ok, revision, current = await self._store.compare_and_swap(
            KV + request.key, request.expected_mod_revision, request.value
        )
        response = metadata_pb2.CompareAndSwapResponse(succeeded=ok, revision=revision)
        if current is not None:
            response.current.CopyFrom(_kv(current))
        return response

    async def Watch(
        self, request: metadata_pb2.WatchKeysRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[metadata_pb2.KeyEvent]:
        try:
            check_prefix(request.prefix, self._limits)
            if request.start_revision < 0:
                raise ValueError("start_revision must not be negative")
            after = request.start_revision or await self._store.revision()
            try:
                changes = self._store.watch(KV + request.prefix, after)
                async for change in until_closing(changes, self.closing):
                    if self._authorizer.readable(change.key[len(KV) :]):
                        yield _event(change)
            except Compacted as exc:
                raise OutOfRange(
                    f"revision {request.start_revision} is no longer retained: Range, then watch from its revision"
                ) from exc
        except Exception as exc:
            await abort_with(context, exc)
