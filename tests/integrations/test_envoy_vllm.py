"""Real Envoy → kvmesh router's ext_proc endpoint picker → real vLLM-on-CPU servers (the tiny model).

The vLLM pods join the mesh as engine members registered from the test (the role the `kvmesh agent`
sidecar plays in a deployment: OpenAI address, model). Which server answered is read from each
server's own `vllm:request_success_total` counter.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from kvmesh.membership import MemberSession
from kvmesh.tools.testing.envoy import start_envoy
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.vllm import MODEL_NAME, VllmServer, start_vllm, words
from kvmesh.v1 import common_pb2, router_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SUCCESS = "vllm:request_success_total"


def served(servers: list[VllmServer]) -> list[float]:
    return [s.metrics().get(SUCCESS, 0.0) for s in servers]


async def test_envoy_routes_openai_requests_to_real_vllm_servers(tmp_path: Path) -> None:
    servers = [start_vllm(tmp_path / f"v{i}", wait=False, name=f"vllm{i}") for i in range(2)]
    sessions: list[MemberSession] = []
    try:
        # Two servers starting together on a small, busy machine: give them longer than one alone.
        await asyncio.gather(*(asyncio.to_thread(s.wait_healthy, 600) for s in servers))
        picker = f"127.0.0.1:{free_port()}"
        async with process_mesh(routers=1, router_settings={"ext_proc_listen": picker, "policy": "prefix"},
                                timeout=None) as mesh:
            for i, server in enumerate(servers):
                member = common_pb2.Member(id=f"vllm-{i}", role=common_pb2.ROLE_ENGINE, address=server.address,
                                           model=MODEL_NAME)
                session = MemberSession(mesh.metadata_addresses, member, 10)
                await session.start()
                sessions.append(session)
            stub = mesh.router_stub()

            async def members(n: int) -> bool:
                stats = await stub.Stats(router_pb2.RouterStatsRequest())
                assert stats.members == n
                return True

            await eventually(lambda: members(2), timeout=20, what="two vLLM members at the router")
            envoy = await asyncio.to_thread(start_envoy, tmp_path, picker)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                    async def complete(prompt: str, stream: bool = False) -> tuple[int, str]:
                        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0.0,
                                "stream": stream}
                        async with http.post(envoy.url + "/v1/completions", json=body) as resp:
                            return resp.status, await resp.text()

                    # Each conversation's repeats land on one server, and get the same greedy answer.
                    for start in (100, 400):
                        prompt = words(list(range(start, start + 64)))
                        before = await asyncio.to_thread(served, servers)
                        answers = set()
                        for _ in range(3):
                            status, text = await complete(prompt)
                            assert status == 200, text
                            answers.add(json.loads(text)["choices"][0]["text"])
                        after = await asyncio.to_thread(served, servers)
                        assert sorted(a - b for a, b in zip(after, before, strict=True)) == [0.0, 3.0], (before, after)
                        assert len(answers) == 1

                    # Streaming through Envoy: server-sent events to [DONE], then the load is released.
                    status, text = await complete(words(list(range(700, 740))), stream=True)
                    assert status == 200, text
                    assert text.strip().splitlines()[-1] == "data: [DONE]"

                    async def released() -> bool:
                        return (await stub.Stats(router_pb2.RouterStatsRequest())).inflight == 0

                    await eventually(released, timeout=10, what="in-flight load released")

                    # A departed pod is never chosen.
                    await sessions[0].close(deregister=True)
                    await eventually(lambda: members(1), timeout=20, what="one vLLM member left")
                    before = await asyncio.to_thread(served, servers)
                    for start in (100, 400, 900):
                        status, text = await complete(words(list(range(start, start + 64))))
                        assert status == 200, text
                    after = await asyncio.to_thread(served, servers)
                    assert after[0] == before[0] and after[1] - before[1] == 3.0, (before, after)
            finally:
                envoy.stop()
                for session in sessions:
                    await session.close(deregister=False)
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)
