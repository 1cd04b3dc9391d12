"""A real Envoy in front of real kvmesh processes: Envoy → router's ext_proc endpoint picker →
simulated engines answering OpenAI HTTP (`kvmesh enginesim --http-listen`).

The engines are real `kvmesh enginesim` processes with real LRU prefix caches; which engine served
a request comes back in the `x-kvmesh-engine` header and how much of the prompt it found cached in
`usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvmesh.tools.certs import issue, make_ca
from kvmesh.tools.testing.envoy import (
    COMPOSE_PICKER_TLS,
    K8S_PICKER_TLS,
    EnvoyGateway,
    envoy_config,
    start_envoy,
    validate_config,
)
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import router_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "sim-model"
ENGINE = {"http_listen": "127.0.0.1:0", "pool": False, "block_tokens": 16, "speedup": 20.0, "model": MODEL,
          "capacity_blocks": 4000}


@dataclass
class Gateway:
    mesh: MeshHandle
    envoy: EnvoyGateway
    picker: str
    http: aiohttp.ClientSession

    async def post(self, path: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.http.post(self.envoy.url + path, data=data,
                                  headers={"content-type": "application/json"}) as resp:
            text = await resp.text()
            try:
                doc = json.loads(text)
            except ValueError:
                doc = text
            return resp.status, dict(resp.headers), doc

    async def inflight(self) -> int:
        stats = await self.mesh.router_stub().Stats(router_pb2.RouterStatsRequest())
        return int(stats.inflight)

    async def wait_engines(self, count: int) -> None:
        async def check() -> bool:
            stats = await self.mesh.router_stub().Stats(router_pb2.RouterStatsRequest())
            assert stats.members == count, f"router sees {stats.members} engines, expected {count}"
            return True

        await eventually(check, timeout=20, interval=0.1, what=f"{count} engines at the router")


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, engines: int = 3, failure_mode_allow: bool = False,
                  **router: Any) -> AsyncIterator[Gateway]:
    picker = f"127.0.0.1:{free_port()}"
    router_settings = {"ext_proc_listen": picker, "policy": "prefix", **router}
    async with process_mesh(routers=1, engines=engines, router_settings=router_settings, engine_settings=ENGINE,
                            timeout=None, ready_timeout=60) as mesh:
        envoy = await asyncio.to_thread(start_envoy, tmp_path, picker, failure_mode_allow)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                gw = Gateway(mesh, envoy, picker, http)
                await gw.wait_engines(engines)
                yield gw
        finally:
            envoy.stop()


def chat(conversation: str, turn: str, max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "stream": stream, "messages": [
        {"role": "system", "content": f"You are agent {conversation}. " + "Follow the tool protocol. " * 12},
        {"role": "user", "content": turn},
    ]}


async def test_shared_prefixes_land_on_the_same_engine(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        served: dict[str, set[str]] = {}
        cached = 0
        for turn in range(4):
            for conversation in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
                status, headers, doc = await gw.post("/v1/chat/completions",
                                                     chat(conversation, f"question {turn} " * 8))
                assert status == 200, doc
                assert doc["object"] == "chat.completion"
                served.setdefault(conversation, set()).add(headers["x-kvmesh-engine"])
                if turn:
                    cached += doc["usage"]["prompt_tokens_details"]["cached_tokens"]
        # Every later turn of a conversation went where its long system prompt was cached.
        assert all(len(engines) == 1 for engines in served.values()), served
        assert cached > 0
        # ...and the conversations were spread over more than one engine.
        assert len(set().union(*served.values())) > 1, served

        async def released() -> bool:
            return await gw.inflight() == 0

        # Envoy closes the ext_proc stream (which releases the load) just after the last response.
        await eventually(released, timeout=10, what="every request's in-flight load to be released")


async def test_a_departed_engine_is_never_chosen(tmp_path: Path) -> None:
    async with gateway(tmp_path, engines=3) as gw:
        first: dict[str, str] = {}
        for conversation in ("a", "b", "c", "d", "e", "f"):
            status, headers, doc = await gw.post("/v1/chat/completions", chat(conversation, "hello"))
            assert status == 200, doc
            first[conversation] = headers["x-kvmesh-engine"]
        gone = first["a"]
        await gw.mesh.stop(gone)
        await gw.wait_engines(2)
        for conversation in ("a", "b", "c", "d", "e", "f"):
            for _ in range(3):
                status, headers, doc = await gw.post("/v1/chat/completions", chat(conversation, "hello again"))
                assert status == 200, doc
                assert headers["x-kvmesh-engine"] != gone


async def test_no_engine_is_503_and_malformed_bodies_are_4xx(tmp_path: Path) -> None:
    async with gateway(tmp_path, engines=1) as gw:
        cases: list[tuple[bytes, int, str]] = [
            (b"{not json", 400, "not JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (json.dumps({"model": MODEL, "prompt": [1, -5]}).encode(), 400, "token ids"),
            (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
            (json.dumps({"model": 7, "prompt": "x"}).encode(), 400, "model"),
        ]
        for raw, status, words in cases:
            got, _, doc = await gw.post("/v1/completions", None, raw=raw)
            assert got == status, (raw, doc)
            assert words in doc["error"]["message"], doc
        # The router kept serving through all of that.
        status, _, doc = await gw.post("/v1/completions", {"model": MODEL, "prompt": "still here " * 10})
        assert status == 200, doc

        async def released() -> bool:
            return await gw.inflight() == 0

        # Envoy closes the ext_proc stream (which releases the load) just after the response.
        await eventually(released, timeout=10, what="the request's in-flight load to be released")
        # No engine left: the picker answers 503 itself.
        engine = gw.mesh.of_role("engine")[0].name
        await gw.mesh.stop(engine)
        await gw.wait_engines(0)
        status, _, doc = await gw.post("/v1/completions", {"model": MODEL, "prompt": "anyone? " * 10})
        assert status == 503, doc
        assert doc["error"]["type"] == "unavailable"


async def test_streaming_response_works_and_releases_its_load(tmp_path: Path) -> None:
    async with gateway(tmp_path, engines=2) as gw:
        # 2,000 tokens of simulated decode keep the stream open for about a second after its first chunk.
        body = {"model": MODEL, "prompt": "stream me " * 20, "max_tokens": 2000, "stream": True}
        async with gw.http.post(gw.envoy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            engine = resp.headers["x-kvmesh-engine"]
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            # While the response streams, the request loads the engine the picker chose.
            assert await gw.inflight() == 1
            rest = (await resp.content.read()).decode()
        events = [line for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert len(chunks) == 2000
        assert chunks[-1]["kvmesh"]["member_id"] == engine

        async def released() -> bool:
            return await gw.inflight() == 0

        await eventually(released, timeout=5, what="in-flight load released")


async def test_router_down_fails_closed(tmp_path: Path) -> None:
    """failure_mode_allow: false — with the picker gone Envoy answers 5xx, never an unchosen engine."""
    async with gateway(tmp_path, engines=1) as gw:
        status, _, doc = await gw.post("/v1/completions", {"model": MODEL, "prompt": "before " * 10})
        assert status == 200, doc
        router = gw.mesh.of_role("router")[0].name
        await gw.mesh.kill(router)
        status, _, doc = await gw.post("/v1/completions", {"model": MODEL, "prompt": "after " * 10})
        assert 500 <= status < 600, (status, doc)
        # The picker back on the same port: requests flow again.
        await gw.mesh.restart(router)
        await gw.wait_engines(1)

        async def flows() -> bool:
            got, _, body = await gw.post("/v1/completions", {"model": MODEL, "prompt": "again " * 10})
            assert got == 200, body
            return True

        await eventually(flows, timeout=20, interval=0.2, what="requests through the restarted picker")


def test_shipped_gateway_configs_are_current_and_envoy_accepts_them(tmp_path: Path) -> None:
    """deploy/compose/envoy.yaml and the demo overlay's ConfigMap are the documented config (mutual
    TLS to the picker with the gateway's own certificate)."""
    root = Path(__file__).resolve().parents[2]
    compose = (root / "deploy" / "compose" / "envoy.yaml").read_text()
    body = "".join(line + "\n" for line in compose.splitlines() if not line.startswith("# Generated")
                   and not line.startswith("# tests/integrations"))
    assert body == envoy_config("router:9002", "0.0.0.0:8080", 9901, picker_tls=COMPOSE_PICKER_TLS)
    manifests = list(yaml.safe_load_all((root / "deploy" / "k8s" / "overlays" / "demo" / "gateway.yaml").read_text()))
    configmap = next(m for m in manifests if m["kind"] == "ConfigMap")
    k8s = configmap["data"]["envoy.yaml"]
    assert k8s == envoy_config("kvmesh-router:9002", "0.0.0.0:8080", 9901, picker_tls=K8S_PICKER_TLS)
    # Envoy loads the certificate files it names: put real ones where the deployments mount them.
    ca = make_ca(tmp_path / "pki", "gateway test CA")
    gateway = issue(ca, "gateway", tmp_path / "pki")
    for name, text, tls in (("compose", compose, COMPOSE_PICKER_TLS), ("k8s", k8s, K8S_PICKER_TLS)):
        for mounted, here in ((tls.cert, gateway.cert), (tls.key, gateway.key), (tls.ca, ca.cert_path)):
            assert f"{{filename: {mounted}}}" in text, (name, mounted)
            text = text.replace(f"{{filename: {mounted}}}", f"{{filename: {here}}}")
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        done = validate_config(path)
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
    # The check has teeth: a misspelt field is refused.
    broken = tmp_path / "broken.yaml"
    broken.write_text((tmp_path / "k8s.yaml").read_text().replace("use_http_header", "use_http_headers"))
    done = validate_config(broken)
    assert done.returncode != 0 and "use_http_headers" in done.stderr, done.stderr[-2000:]
