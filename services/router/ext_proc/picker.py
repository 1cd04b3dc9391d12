"""The endpoint picker: Envoy's `ext_proc` stream for one HTTP request, answered by the router core.

Envoy opens one `ExternalProcessor.Process` stream per HTTP request (processing mode: request
headers, request body BUFFERED; the shipped config skips the response phases) and keeps it open
until the HTTP stream is over. The picker waits for
the whole body, reads the OpenAI JSON (`kvmesh/openai_prompt.py`), routes it exactly as `Route` does
(`RouterCore.route_text` / `route_tokens`), and answers with the chosen pod's `ip:port` in the
request header `x-gateway-destination-endpoint` and in dynamic metadata `envoy.lb`, which an
`ORIGINAL_DST` cluster reads. The request counts as in flight on that pod until Envoy closes the
stream (the response's end, a reset, a client gone), or until the response body's end of stream
when Envoy is configured to send it.

Requests it cannot route get an immediate response instead: 400 for a body it cannot read,
413 for a body over the limit, 503 when no live pod can serve, 429 when every pod is at the
shedding limit. A pod that left (kept by the core for `--rejoin-grace-seconds` as a last
resort) is never sent a request: that is a 503 too. The HTTP face of an engine is its
`openai-address` label when it has one (the engine simulator serves gRPC at its member
address), else the member address itself (a vLLM pod registered by its sidecar).

With a security policy the gateway's principal (its client certificate, or a token) must be
allowed to route (`allows_route`), else the stream ends PERMISSION_DENIED before anything is
routed; its requests are in flight under its name, so no `Router.Release` by anyone else drops them.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from kvmesh.openai_prompt import BadBody, PromptSpec, parse_body
from kvmesh.runtime.errors import InvalidArgument, KvmeshError, Unavailable, status_for
from kvmesh.services.router.access import RouterAccess
from kvmesh.services.router.core import Decision, RouterCore

log = logging.getLogger("kvmesh.router.ext_proc")

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
OPENAI_ADDRESS_LABEL = "openai-address"
_JSON = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"))


class Rejected(Exception):
    """The request is answered by the picker itself with an HTTP status."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def immediate(status: int, kind: str, message: str) -> ep.ProcessingResponse:
    """An OpenAI-style JSON error that Envoy sends to the client without calling any engine."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type,unused-ignore]
            headers=ep.HeaderMutation(set_headers=[_JSON]),
            body=body,
            details=f"kvmesh_{kind}",
        )
    )


def destination(endpoint: str, clear_route_cache: bool = False) -> tuple[ep.CommonResponse, struct_pb2.Struct]:
    """The header mutation and the `envoy.lb` metadata that send the request to `endpoint`."""
    common = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoint.encode()),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        ),
        clear_route_cache=clear_route_cache,
    )
    metadata = struct_pb2.Struct()
    metadata.get_or_create_struct(LB_NAMESPACE)[DESTINATION_HEADER] = endpoint
    return common, metadata


class PickerLimits:
    """The picker's bounds (from `RouterSettings`): body size and the load-shedding threshold."""

    __slots__ = ("max_body_bytes", "shed_inflight")

    def __init__(self, max_body_bytes: int, shed_inflight: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.shed_inflight = shed_inflight


class ExtProcApi(ep_grpc.ExternalProcessorServicer):
    """`envoy.service.ext_proc.v3.ExternalProcessor` over a `RouterCore`."""

    def __init__(self, core: RouterCore, limits: PickerLimits, access: RouterAccess | None = None) -> None:
        self.core = core
        self.limits = limits
        self.access = access or RouterAccess(None)
        self._ids = itertools.count(1)
        self.picked = 0
        self.rejected = 0

    # ---- one decision
    def endpoint_of(self, decision: Decision) -> str:
        pod = self.core.pods.get(decision.member_id)
        if pod is not None:
            return pod.labels.get(OPENAI_ADDRESS_LABEL) or pod.address
        return decision.address

    def _shedding(self, model: str) -> bool:
        limit = self.limits.shed_inflight
        if limit <= 0:
            return False
        pods = self.core.pods
        mask = pods.candidates(model)
        return bool(mask) and min(pods.loads_of(mask)) >= limit

    def pick(self, spec: PromptSpec, request_id: str, owner: str = "") -> Decision:
        """Routes like `Route` does; raises `Rejected` with the HTTP answer otherwise."""
        if self._shedding(spec.model):
            raise Rejected(429, "overloaded", "every engine is at the load-shedding limit; retry later")
        core = self.core
        try:
            if spec.tokens is not None:
                decision = core.route_tokens(spec.tokens, spec.model, request_id, owner=owner)
            elif spec.text:
                decision = core.route_text(spec.text, spec.model, request_id, owner=owner)
            else:
                decision = core.route((), spec.model, request_id, checked=True, owner=owner)
        except Unavailable as exc:
            raise Rejected(503, "unavailable", f"no engine can serve model {spec.model!r}: {exc}") from None
        except InvalidArgument as exc:
            raise Rejected(400, "invalid_request_error", str(exc)) from None
        pod = core.pods.get(decision.member_id)
        if pod is None or pod.departed_at is not None:
            # The core's last resort while no engine is live is a pod that left within
            # --rejoin-grace-seconds; an HTTP request cannot wait for it to come back.
            core.release(decision.request_id, owner)
            raise Rejected(503, "unavailable", f"no live engine can serve model {spec.model!r}")
        return decision

    def _answer(self, body: bytes, request_id: str, phase: str, owner: str = "") -> tuple[ep.ProcessingResponse, bool]:
        """The response to the request's last inbound message, and whether it was routed."""
        try:
            if len(body) > self.limits.max_body_bytes:
                raise Rejected(413, "invalid_request_error",
                               f"body of {len(body)} bytes is over --ext-proc-max-body-bytes")
            try:
                spec = parse_body(body)
            except BadBody as exc:
                raise Rejected(400, "invalid_request_error", str(exc)) from None
            decision = self.pick(spec, request_id, owner)
        except Rejected as exc:
            self.rejected += 1
            return immediate(exc.status, exc.kind, str(exc)), False
        self.picked += 1
        common, metadata = destination(self.endpoint_of(decision))
        if phase == "headers":
            return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common),
                                         dynamic_metadata=metadata), True
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common), dynamic_metadata=metadata), True

    # ---- the stream
    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        request_id = f"xp{next(self._ids)}"
        try:
            owner = self.access.route_owner()  # the gateway's principal must be allowed to route
        except KvmeshError as exc:
            code, message = status_for(exc)
            try:
                await context.abort(code, message)
            except grpc.aio.AbortError:
                return  # the status is set; ending quietly keeps it from turning INTERNAL
        routed = False
        body = bytearray()
        limit = self.limits.max_body_bytes
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    if message.request_headers.end_of_stream:  # no body (GET): routed by load
                        response, routed = self._answer(b"", request_id, "headers", owner)
                        yield response
                    else:
                        yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                elif kind == "request_body":
                    chunk = message.request_body
                    if len(body) <= limit:  # past the limit, stop copying: the answer is 413 anyway
                        body += chunk.body
                    if chunk.end_of_stream:
                        response, routed = self._answer(bytes(body), request_id, "body", owner)
                        body = bytearray()
                        yield response
                    else:
                        yield ep.ProcessingResponse(request_body=ep.BodyResponse())
                elif kind == "request_trailers":
                    # The body's end of stream came first (BUFFERED mode): nothing to decide here.
                    yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
                # The load drops before the answer goes out, so whoever sees the answer sees it dropped.
                elif kind == "response_headers":
                    if message.response_headers.end_of_stream and routed:
                        routed = not self.core.release(request_id, owner)
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
                elif kind == "response_body":
                    if message.response_body.end_of_stream and routed:
                        routed = not self.core.release(request_id, owner)
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())
                elif kind == "response_trailers":
                    if routed:
                        routed = not self.core.release(request_id, owner)
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
                else:
                    # Observability-only or unknown messages need no answer.
                    continue
        finally:
            # The response ended without an end of stream we saw: a reset, a client gone, Envoy
            # closing the stream. Either way the request no longer loads the pod.
            if routed:
                self.core.release(request_id, owner)
