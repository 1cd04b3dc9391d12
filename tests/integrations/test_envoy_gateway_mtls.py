"""A real Envoy dialling the router's endpoint picker over mutual TLS, on a mesh that runs mTLS
everywhere and a router that enforces a policy: the picker serves on the router's own `--tls-*`
files, Envoy presents a client certificate, and only a gateway principal allowed to route gets
requests routed (any other fails closed: Envoy answers 5xx, no engine is chosen)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.certs import CA, issue, make_ca, tls_flags
from kvmesh.tools.testing.envoy import PickerTLS, start_envoy
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.integrations.test_envoy_gateway import ENGINE, MODEL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

POLICY = {"principals": {
    "gateway": {"route": True},
    "engine-*": {"events": ["self"]},
    "router-*": {"register": {"roles": ["router"]}},
    "ops": {"admin": True},
}}


def flags(ca: CA, name: str, directory: Path) -> dict[str, Any]:
    """Settings of a member presenting `name`'s certificate (mutual TLS both ways)."""
    issued = issue(ca, name, directory)
    values = tls_flags(ca, issued)
    return {values[i].removeprefix("--").replace("-", "_"): values[i + 1] for i in range(0, len(values), 2)}


async def test_envoy_reaches_the_picker_over_mutual_tls_as_an_authorized_gateway(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = make_ca(pki, "kvmesh test CA")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    picker = f"127.0.0.1:{free_port()}"
    router = {"ext_proc_listen": picker, "policy": "prefix", "security_policy": policy,
              **flags(ca, "router-0", pki)}
    async with process_mesh(metadata=1, routers=1, wait_registered=False, timeout=None, ready_timeout=60,
                            metadata_settings=flags(ca, "metadata", pki), router_settings=router) as mesh:
        for i in range(2):
            engine: dict[str, Any] = {**ENGINE, **flags(ca, f"engine-{i}", pki)}
            await mesh.add("engine", **engine)
        ops = issue(ca, "ops", pki)
        tls = ClientTLS(TLSFiles(tls_ca=ca.cert_path, tls_cert=ops.cert, tls_key=ops.key))
        async with open_channel(mesh.router_address, tls=tls) as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            async def engines() -> bool:
                assert (await stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)).members == 2
                return True

            await eventually(engines, timeout=30, what="both engines at the router", retry_on=(AssertionError,))
            body = {"model": MODEL, "prompt": "over mutual TLS " * 20, "max_tokens": 4}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                for name, allowed in (("gateway", True), ("nobody", False)):
                    own = issue(ca, name, pki)
                    envoy = await asyncio.to_thread(start_envoy, tmp_path, picker, False,
                                                    PickerTLS(ca.cert_path, own.cert, own.key))
                    try:
                        async with http.post(envoy.url + "/v1/completions", json=body) as resp:
                            text = await resp.text()
                            if allowed:
                                assert resp.status == 200, text
                                assert resp.headers["x-kvmesh-engine"] in ("engine-0", "engine-1")
                            else:
                                assert 500 <= resp.status < 600, (resp.status, text)
                                assert "x-kvmesh-engine" not in resp.headers
                    finally:
                        envoy.stop()
            stats = await stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
            assert stats.routed == 1  # the refused gateway routed nothing
