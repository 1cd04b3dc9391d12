"""gRPC handlers of `kvmesh.v1.Router`: a thin translation between protos and `RouterCore`.

Handlers never await between reading the core's state and updating it, so each request is
one atomic step on the event loop. Bad input becomes a status (or, inside RouteStream, an
error response for that one request) and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from kvmesh.runtime.errors import InvalidArgument, KvmeshError, guard, status_for
from kvmesh.services.router.core import Cleared, Decision, KvEvent, Removed, RouterCore, Stored
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger("kvmesh.router")


def decide(core: RouterCore, request: router_pb2.RouteRequest) -> Decision:
    """Routes one request according to how its prompt is given (no prompt: routed by load)."""
    kind = request.WhichOneof("prompt")
    if kind == "blocks":
        return core.route(tuple(request.blocks.ids), request.model, request.request_id, checked=True)
    if kind == "tokens":
        return core.route_tokens(list(request.tokens.ids), request.model, request.request_id)
    if kind == "text":
        return core.route_text(request.text, request.model, request.request_id)
    return core.route((), request.model, request.request_id, checked=True)


def to_response(decision: Decision) -> router_pb2.RouteResponse:
    return router_pb2.RouteResponse(
        request_id=decision.request_id,
        member_id=decision.member_id,
        address=decision.address,
        matched_blocks=decision.matched_blocks,
        total_blocks=decision.total_blocks,
        policy=decision.policy,
    )


def from_proto(index: int, event: router_pb2.KvEvent) -> KvEvent:
    kind = event.WhichOneof("event")
    if kind == "stored":
        return Stored(event.stored.parent_id, list(event.stored.ids))
    if kind == "removed":
        return Removed(list(event.removed.ids))
    if kind == "cleared":
        return Cleared()
    raise InvalidArgument(f"event {index} has no stored/removed/cleared payload")


class RouterApi(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    @guard
    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        return to_response(decide(self.core, request))

    async def RouteStream(
        self, request_iterator: AsyncIterator[router_pb2.RouteRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouteResponse]:
        core = self.core
        async for request in request_iterator:
            try:
                yield to_response(decide(core, request))
            except (KvmeshError, ValueError) as exc:
                code, message = status_for(exc)
                yield router_pb2.RouteResponse(request_id=request.request_id, error_code=code.value[0], error=message)
            except Exception as exc:
                log.exception("routing failed")
                code, message = status_for(exc)
                yield router_pb2.RouteResponse(request_id=request.request_id, error_code=code.value[0], error=message)

    @guard
    async def Release(
        self, request: router_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReleaseResponse:
        if not request.request_id:
            raise InvalidArgument("request_id is required")
        limit = self.core.settings.max_request_id_bytes
        if len(request.request_id.encode()) > limit:
            raise InvalidArgument(f"request_id longer than --max-request-id-bytes {limit}")
        self.core.release(request.request_id)  # unknown ids are fine: release is idempotent
        return router_pb2.ReleaseResponse()

    @guard
    async def ReportEvents(
        self, request_iterator: AsyncIterator[router_pb2.KvEventBatch], context: grpc.aio.ServicerContext
    ) -> router_pb2.ReportEventsResponse:
        out = router_pb2.ReportEventsResponse()
        async for batch in request_iterator:
            if not batch.member_id:
                raise InvalidArgument(f"batch {out.batches}: member_id is required")
            # Convert the whole batch first: a malformed batch changes nothing.
            events = [from_proto(i, e) for i, e in enumerate(batch.events)]
            result = self.core.apply_events(batch.member_id, events)
            out.batches += 1
            out.applied_events += result.applied
            out.ignored_events += result.ignored
            if result.reason:
                out.last_ignored_reason = result.reason
        return out

    @guard
    async def Stats(
        self, request: router_pb2.RouterStatsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterStatsResponse:
        s = self.core.stats()
        return router_pb2.RouterStatsResponse(
            members=s.members,
            tree_nodes=s.tree_nodes,
            routed=s.routed,
            policy=s.policy,
            inflight=s.inflight,
            evicted_blocks=s.evicted_blocks,
            events_applied=s.events_applied,
            events_ignored=s.events_ignored,
            membership_stale=s.membership_stale,
            members_in_grace=s.members_in_grace,
        )
