"""Hypothesis strategies for any protobuf message, built from its descriptor, and a caller
that sends them to any gRPC method: property-based fuzzing of every RPC (tests) and the
hostile client of the soak bench.

Values are chosen to hit limits rather than to be valid: strings and bytes up to a few KiB
(sometimes far past the services' bounds), integers across their whole range, enum numbers
no version of the contract defines, nested messages a few levels deep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Outcomes a client error may get; UNKNOWN, INTERNAL and DATA_LOSS mean the service broke.
CLIENT_ERRORS = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED, grpc.StatusCode.UNAUTHENTICATED,
})

_INTS: dict[int, st.SearchStrategy[int]] = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}


def _sized(small: st.SearchStrategy[Any], huge: Callable[[int], Any]) -> st.SearchStrategy[Any]:
    """Mostly small values, sometimes one far past any service bound."""
    return st.one_of(small, st.sampled_from([70_000, 300_000]).map(huge))


_TEXT = _sized(st.text(max_size=40), lambda n: "x" * n)
_BYTES = _sized(st.binary(max_size=64), lambda n: b"\xab" * n)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return _BYTES
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values] if field.enum_type is not None else [0]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    return _INTS[kind]


def message_strategy(descriptor: Descriptor, depth: int = 3) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with any subset of fields set (oneofs: the last set wins)."""
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if value.message_type is None:
                fields[field.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=4)
            continue
        if field.message_type is not None:
            if depth <= 0:
                continue
            inner = message_strategy(field.message_type, depth - 1)
            fields[field.name] = st.lists(inner, max_size=3) if field.is_repeated else inner
            continue
        if field.is_repeated:
            fields[field.name] = st.lists(_scalar(field), max_size=8)
        else:
            fields[field.name] = _scalar(field)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for name, strategy in fields.items():
            if not draw(st.booleans()):
                continue
            value = draw(strategy)
            target = getattr(message, name)
            if isinstance(value, Message):
                target.CopyFrom(value)
            elif isinstance(value, dict):
                for k, v in value.items():
                    target[k] = v
            elif isinstance(value, list):
                if value and isinstance(value[0], Message):
                    target.extend(value)
                else:
                    target.extend(value)
            else:
                try:
                    setattr(message, name, value)
                except (ValueError, TypeError):  # an enum number the runtime refuses to hold
                    continue
        return message

    return build()


def call_method(channel: grpc.Channel, method: MethodDescriptor, requests: list[Message],
                timeout: float = 3.0, max_responses: int = 3) -> grpc.StatusCode:
    """Sends `requests` (the first only, for a unary request) with a blocking channel and reads
    at most `max_responses`; the status the call ended with (CANCELLED when we stopped reading)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_cls = GetMessageClass(method.output_type)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_cls.FromString,
    }
    try:
        if method.client_streaming and method.server_streaming:
            responses = channel.stream_stream(path, **kwargs)(iter(requests), timeout=timeout)
            return _drain(responses, max_responses)
        if method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter(requests), timeout=timeout)
            return grpc.StatusCode.OK
        if method.server_streaming:
            responses = channel.unary_stream(path, **kwargs)(requests[0], timeout=timeout)
            return _drain(responses, max_responses)
        channel.unary_unary(path, **kwargs)(requests[0], timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _drain(responses: Any, max_responses: int) -> grpc.StatusCode:
    for count, _ in enumerate(responses, 1):
        if count >= max_responses:
            responses.cancel()
            return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK
