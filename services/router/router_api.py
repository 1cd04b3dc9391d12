"""gRPC handlers of `kvmesh.v1.Router`: a thin translation between protos and `RouterCore`.

Handlers never await between reading the core's state and updating it, so each request is
one atomic step on the event loop. Bad input becomes a status (or, inside RouteStream, an
error response for that one request) and changes nothing.

With a security policy (`RouterAccess`): routing and releasing need `allows_route`, and each
request belongs to the principal that routed it; a `Release` of a request id the caller does
not own answers exactly as an unknown id does (OK, nothing changes), unless the caller is an
admin. `ReportEvents` checks `allows_events` for every batch: a batch for a pod the caller may
not speak for ends the stream with PERMISSION_DENIED before it changes anything; the batches
before it (each one authorized) stay applied, and nothing after it is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from kvmesh.runtime.errors import InvalidArgument, KvmeshError, guard, status_for
from kvmesh.services.router.access import RouterAccess
from kvmesh.services.router.core import Cleared, Decision, KvEvent, Removed, RouterCore, Stored, event_slices
from kvmesh.services.router.kv_events.subscriber import KvEventSubscriber
from kvmesh.services.router.tokenize import Tokenizers
from kvmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger("kvmesh.router")


def decide(core: RouterCore, request: router_pb2.RouteRequest, owner: str = "") -> Decision:
    """Routes one request according to how its prompt is given (no prompt: routed by load);
    `owner` is the principal routing it (the only one, with admins, that may release it)."""
    kind = request.WhichOneof("prompt")
    if kind == "blocks":
        return core.route(tuple(request.blocks.ids), request.model, request.request_id, checked=True, owner=owner)
    if kind == "tokens":
        return core.route_tokens(list(request.tokens.ids), request.model, request.request_id, owner=owner)
    if kind == "text":
        return core.route_text(request.text, request.model, request.request_id, owner=owner)
    return core.route((), request.model, request.request_id, checked=True, owner=owner)


async def decide_async(
    core: RouterCore, request: router_pb2.RouteRequest, tokenizers: Tokenizers | None, inline_chars: int,
    owner: str = "",
) -> Decision:
    """`decide`, tokenizing text first for models given with --tokenizer (long texts in a thread)."""
    if tokenizers and request.WhichOneof("prompt") == "text" and request.model in tokenizers:
        text = request.text
        if len(text) >= (core.settings.max_prompt_blocks + 1) * core.settings.block_size * 64:
            raise InvalidArgument("text prompt is over --max-prompt-blocks")
        if len(text) > inline_chars:
            tokens = await asyncio.to_thread(tokenizers.encode, request.model, text)
        else:
            tokens = tokenizers.encode(request.model, text)
        return core.route_tokens(tokens, request.model, request.request_id, owner=owner)
    return decide(core, request, owner)


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
    def __init__(
        self, core: RouterCore, tokenizers: Tokenizers | None = None, kv_events: KvEventSubscriber | None = None,
        access: RouterAccess | None = None,
    ) -> None:
        self.core = core
        self.tokenizers = tokenizers
        self.kv_events = kv_events
        self.access = access or RouterAccess(None)

    @guard
    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        owner = self.access.route_owner()
        if self.tokenizers:
            decision = await decide_async(self.core, request, self.tokenizers, self.core.settings.tokenize_inline_chars,
                                          owner)
            return to_response(decision)
        return to_response(decide(self.core, request, owner))

    async def RouteStream(
        self, request_iterator: AsyncIterator[router_pb2.RouteRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouteResponse]:
        core = self.core
        tokenizers = self.tokenizers
        inline = core.settings.tokenize_inline_chars
        access = self.access
        try:
            access.route_owner()  # the whole stream is refused up front when the caller may not route
        except KvmeshError as exc:
            code, message = status_for(exc)
            try:
                await context.abort(code, message)
            except grpc.aio.AbortError:
                # The status is set; ending quietly (rather than raising out of a generator that
                # has not yielded) keeps it from reaching the client as INTERNAL.
                return
        async for request in request_iterator:
            try:
                owner = access.route_owner()  # per request too: a policy reload may revoke the grant
                if tokenizers:
                    yield to_response(await decide_async(core, request, tokenizers, inline, owner))
                else:
                    yield to_response(decide(core, request, owner))
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
        owner = self.access.route_owner()  # authorization first: a refused caller learns nothing more
        if not request.request_id:
            raise InvalidArgument("request_id is required")
        limit = self.core.settings.max_request_id_bytes
        if len(request.request_id.encode()) > limit:
            raise InvalidArgument(f"request_id longer than --max-request-id-bytes {limit}")
        # Unknown ids are fine (release is idempotent); another principal's id is answered the
        # same way and changes nothing, so a release tells nobody whether the id exists.
        if not self.core.release(request.request_id, owner) and self.access.is_admin():
            self.core.release_any(request.request_id)
        return router_pb2.ReleaseResponse()

    @guard
    async def ReportEvents(
        self, request_iterator: AsyncIterator[router_pb2.KvEventBatch], context: grpc.aio.ServicerContext
    ) -> router_pb2.ReportEventsResponse:
        out = router_pb2.ReportEventsResponse()
        async for batch in request_iterator:
            if not batch.member_id:
                raise InvalidArgument(f"batch {out.batches}: member_id is required")
            self.access.check_events(batch.member_id)  # before anything of this batch is applied
            # Convert the whole batch first: a malformed batch changes nothing.
            events: list[KvEvent] = []
            step = self.core.settings.event_slice_blocks
            for i, e in enumerate(batch.events):
                events.append(from_proto(i, e))
                if i % step == step - 1:
                    await asyncio.sleep(0)  # converting a huge batch is sliced too
            out.batches += 1
            # One slice of about --event-slice-blocks blocks per loop turn: a huge batch (or a
            # huge stored run) never holds routing for longer than one slice takes.
            for piece in event_slices(events, self.core.settings.event_slice_blocks):
                result = self.core.apply_events(batch.member_id, piece)
                out.applied_events += result.applied
                out.ignored_events += result.ignored
                if result.reason:
                    out.last_ignored_reason = result.reason
                await asyncio.sleep(0)
        return out

    @guard
    async def Stats(
        self, request: router_pb2.RouterStatsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterStatsResponse:
        s = self.core.stats()
        out = router_pb2.RouterStatsResponse(warm=True)
        kv = self.kv_events
        if kv is not None:
            out.warm = kv.warm()
            out.kv_event_pods = len(kv.ingest.streams)
            out.kv_event_batches = kv.stats.received
            out.kv_event_dropped = kv.stats.dropped
            out.kv_event_replays = kv.stats.replays
            out.kv_event_restarts = kv.stats.restarts
            out.kv_event_blocks = kv.ingest.counters.stored_blocks
        out.MergeFrom(
            router_pb2.RouterStatsResponse(
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
        )
        return out
