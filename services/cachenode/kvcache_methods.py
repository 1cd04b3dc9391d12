"""The KVCache method table, with hand-coded messages on the two streams that carry values.

Every method uses the generated protobuf classes except BatchPut requests and BatchGet
responses, which go through `kvmesh.wire` (same bytes on the wire, fewer copies of
the values). The table is derived from the service descriptor, so a method added to the
proto is served without touching this file.
"""

from __future__ import annotations

from typing import Any

import grpc

from kvmesh import wire
from kvmesh.v1 import cachenode_pb2

SERVICE = cachenode_pb2.DESCRIPTOR.services_by_name["KVCache"]

# method → (request deserializer, response serializer) replacing the generated ones
_RAW: dict[str, tuple[Any, Any]] = {
    "BatchPut": (wire.decode_put_chunk_or_error, cachenode_pb2.BatchPutResponse.SerializeToString),
    "BatchGet": (cachenode_pb2.BatchGetRequest.FromString, wire.serialize_message_or_bytes),
}


def method_handlers(servicer: Any) -> dict[str, grpc.RpcMethodHandler]:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request_cls = getattr(cachenode_pb2, method.input_type.name)
        response_cls = getattr(cachenode_pb2, method.output_type.name)
        deserialize, serialize = _RAW.get(method.name, (request_cls.FromString, response_cls.SerializeToString))
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=deserialize, response_serializer=serialize)
    return handlers


def add_kvcache_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
