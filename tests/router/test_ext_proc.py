"""The ext_proc endpoint picker over a real gRPC stream, speaking Envoy's messages (no Envoy here:
tests/integrations/test_envoy_gateway.py runs the real one). Checks the protocol details Envoy
cannot show directly: the exact header and metadata, the statuses, and the in-flight bookkeeping."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.openai_prompt import BadBody, parse_body, render_messages
from kvmesh.services.router.core import RouterCore
from kvmesh.services.router.ext_proc.server import SERVICE_NAME, ExtProcServer
from kvmesh.tools.testing.polling import eventually
from tests.router.helpers import member, settings

MODEL = "m"


def headers(end_of_stream: bool = False, path: str = "/v1/completions") -> ep.ProcessingRequest:
    hs = [base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
          base_pb2.HeaderValue(key=":method", raw_value=b"POST")]
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=hs), end_of_stream=end_of_stream))


def body(doc: Any, raw: bytes | None = None) -> ep.ProcessingRequest:
    data = raw if raw is not None else json.dumps(doc).encode()
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=True))


class Picker:
    def __init__(self, core: RouterCore, stub: ep_grpc.ExternalProcessorStub, channel: grpc.aio.Channel) -> None:
        self.core, self.stub, self.channel = core, stub, channel

    async def exchange(self, *messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        call = self.stub.Process()
        out = []
        for m in messages:
            await call.write(m)
            out.append(await call.read())
        await call.done_writing()
        await call.code()  # the stream has ended before the fixture can stop the server
        return out

    def inflight(self) -> int:
        return self.core.stats().inflight


@pytest.fixture
async def picker() -> AsyncIterator[Picker]:
    s = settings(ext_proc_listen="127.0.0.1:0", ext_proc_max_body_bytes=4096, ext_proc_shed_inflight=3)
    core = RouterCore(settings=s)
    for i in range(2):
        m = member(f"e{i}", model=MODEL, port=9000 + i)
        m.labels["openai-address"] = f"127.0.0.{i + 1}:8000"
        core.add_member(m)
    server = ExtProcServer(core, s)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Picker(core, ep_grpc.ExternalProcessorStub(channel), channel)
    finally:
        await channel.close()
        await server.close(0)


def destination_of(response: ep.ProcessingResponse) -> str:
    which = response.WhichOneof("response")
    common = getattr(response, which).response
    (option,) = common.header_mutation.set_headers
    assert option.header.key == "x-gateway-destination-endpoint"
    endpoint = option.header.raw_value.decode()
    assert response.dynamic_metadata["envoy.lb"]["x-gateway-destination-endpoint"] == endpoint
    return endpoint


async def test_body_routes_to_the_pods_openai_address_and_the_response_end_releases(picker: Picker) -> None:
    call = picker.stub.Process()
    await call.write(headers())
    assert (await call.read()).WhichOneof("response") == "request_headers"
    await call.write(body({"model": MODEL, "prompt": "a shared prefix " * 20}))
    routed = await call.read()
    assert destination_of(routed) in ("127.0.0.1:8000", "127.0.0.2:8000")
    assert picker.inflight() == 1
    await call.write(ep.ProcessingRequest(response_headers=ep.HttpHeaders()))
    await call.read()
    await call.write(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: x\n\n")))
    await call.read()
    assert picker.inflight() == 1  # still streaming
    await call.write(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"", end_of_stream=True)))
    await call.read()
    assert picker.inflight() == 0
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK  # the stream ends before the fixture stops the server


async def test_same_prefix_same_endpoint_and_chat_is_routed(picker: Picker) -> None:
    chat: dict[str, Any] = {"model": MODEL, "messages": [{"role": "system", "content": "tools " * 40},
                                                         {"role": "user", "content": "hi"}]}
    first = destination_of((await picker.exchange(headers(), body(chat)))[1])
    for turn in range(3):
        chat["messages"].append({"role": "user", "content": f"turn {turn}"})
        assert destination_of((await picker.exchange(headers(), body(chat)))[1]) == first


async def test_a_reset_stream_releases_its_load(picker: Picker) -> None:
    call = picker.stub.Process()
    await call.write(headers())
    await call.read()
    await call.write(body({"model": MODEL, "prompt": [1, 2, 3] * 20}))
    await call.read()
    assert picker.inflight() == 1
    call.cancel()  # Envoy gone mid-response

    async def released() -> bool:
        return picker.inflight() == 0

    await eventually(released, timeout=5, what="release on reset")


async def test_headers_only_request_is_routed_by_load(picker: Picker) -> None:
    (response,) = await picker.exchange(headers(end_of_stream=True, path="/v1/models"))
    assert response.WhichOneof("response") == "request_headers"
    destination_of(response)


@pytest.mark.parametrize(("raw", "status"), [
    (b"{", 400), (b"42", 400), (json.dumps({"prompt": [1, 1 << 33]}).encode(), 400),
    (json.dumps({"prompt": "x" * 5000}).encode(), 413), (json.dumps({"stream": "yes"}).encode(), 400),
])
async def test_bad_bodies_get_an_immediate_4xx_and_nothing_is_counted(picker: Picker, raw: bytes, status: int) -> None:
    _, response = await picker.exchange(headers(), body(None, raw=raw))
    assert response.WhichOneof("response") == "immediate_response"
    assert response.immediate_response.status.code == status
    error = json.loads(response.immediate_response.body)["error"]
    assert error["code"] == status and error["message"]
    assert picker.inflight() == 0


async def test_no_pod_is_503_and_every_pod_at_the_limit_is_429(picker: Picker) -> None:
    calls = []
    for _ in range(6):  # 2 pods x --ext-proc-shed-inflight=3, never released
        call = picker.stub.Process()
        await call.write(headers())
        await call.read()
        await call.write(body({"model": MODEL, "prompt": "x"}))
        await call.read()
        calls.append(call)
    _, shed = await picker.exchange(headers(), body({"model": MODEL, "prompt": "x"}))
    assert shed.immediate_response.status.code == 429
    for call in calls:
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK  # each stream ends before the fixture stops the server
    picker.core.remove_member("e0")
    picker.core.remove_member("e1")
    _, none = await picker.exchange(headers(), body({"model": MODEL, "prompt": "x"}))
    assert none.immediate_response.status.code == 503


async def test_health_follows_the_grpc_health_protocol(picker: Picker) -> None:
    stub = health_pb2_grpc.HealthStub(picker.channel)
    for name in ("", SERVICE_NAME):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_prompt_reader() -> None:
    assert parse_body(b'{"model": "m", "prompt": [[5, 6], [7]]}').tokens == [5, 6]
    assert parse_body(b'{"prompt": ["first", "second"]}').text == "first"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text = render_messages([{"role": "user", "content": parts}])
    assert text == "user: ab\n"
    longer = render_messages([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}])
    assert longer.startswith(text)  # a conversation's later turn extends its earlier blocks
    for bad in (b'{"messages": [1]}', b'{"max_tokens": -1, "prompt": "x"}', b'{"prompt": {"a": 1}}'):
        with pytest.raises(BadBody):
            parse_body(bad)


async def test_a_pod_in_its_rejoin_grace_is_never_sent_a_request(picker: Picker) -> None:
    """The core's last resort with no live engine is a pod that just left; HTTP cannot wait for it."""
    picker.core.leave("e0")
    picker.core.leave("e1")
    _, response = await picker.exchange(headers(), body({"model": MODEL, "prompt": "x" * 100}))
    assert response.immediate_response.status.code == 503
    assert "no live engine" in json.loads(response.immediate_response.body)["error"]["message"]
    assert picker.inflight() == 0
