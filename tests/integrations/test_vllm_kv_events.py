"""The router follows a real vLLM's KV events (central mode) and the agent brings the pod into the mesh.

One vLLM on CPU (tiny random model, 16 KV blocks of 32 tokens, so evictions happen) publishes its
KV events to the router's `--kv-events-listen` SUB socket with topic `kv@engine-1@tiny-llama`;
`kvmesh agent` registers it. The tests run in file order on the same processes: a request's
blocks appear in the tree (routes by tokens and, through `--tokenizer`, by text match them),
evictions and `reset_prefix_cache` remove them, events sent while the router is down come back
by replay, and a killed vLLM leaves the mesh within the lease TTL and leaves no stale block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.vllm import BLOCK_SIZE, MODEL_NAME, VllmServer, start_vllm, tiny_model, words
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc, router_pb2, router_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

T = TypeVar("T")
MEMBER = "engine-1"
TTL = 5
VLLM_READY_S = 600  # a loaded 2-core machine takes minutes to start vLLM


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, grpc.RpcError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def held(scene: Scene, tokens: list[int], blocks: int) -> bool:
    return scene.matched(tokens) == blocks


def prompt(start: int, blocks: int = 3) -> list[int]:
    return list(range(start, start + blocks * BLOCK_SIZE))


@dataclass
class Scene:
    workdir: Path
    metadata: KvmeshProcess
    router: KvmeshProcess
    agent: KvmeshProcess
    vllm: VllmServer
    events_port: int
    replay_port: int
    router_args: list[str]

    def router_stub(self) -> router_pb2_grpc.RouterStub:
        assert self.router.address
        return router_pb2_grpc.RouterStub(grpc.insecure_channel(self.router.address))

    def members(self) -> list[common_pb2.Member]:
        assert self.metadata.address
        stub = metadata_pb2_grpc.MembershipStub(grpc.insecure_channel(self.metadata.address))
        return list(stub.List(metadata_pb2.ListRequest(role=common_pb2.ROLE_ENGINE), timeout=5).members)

    def route(self, tokens: list[int] | None = None, text: str | None = None) -> router_pb2.RouteResponse:
        stub = self.router_stub()
        if text is not None:
            req = router_pb2.RouteRequest(model=MODEL_NAME, text=text)
        else:
            req = router_pb2.RouteRequest(model=MODEL_NAME, tokens=router_pb2.TokenIds(ids=tokens or []))
        resp: router_pb2.RouteResponse = stub.Route(req, timeout=10)
        stub.Release(router_pb2.ReleaseRequest(request_id=resp.request_id), timeout=10)
        return resp

    def matched(self, tokens: list[int]) -> int:
        return int(self.route(tokens).matched_blocks)

    def stats(self) -> router_pb2.RouterStatsResponse:
        return self.router_stub().Stats(router_pb2.RouterStatsRequest(), timeout=10)

    def start_vllm(self, port: int | None = None) -> VllmServer:
        config = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://127.0.0.1:{self.events_port}",
                  "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
                  "topic": f"kv@{MEMBER}@{MODEL_NAME}"}
        server = start_vllm(self.workdir, "--kv-events-config", json.dumps(config), port=port, wait=False)
        try:
            server.wait_healthy(VLLM_READY_S)
        except BaseException:
            server.kill()
            raise
        return server


def start(args: list[str], name: str, timeout: float = 60) -> KvmeshProcess:
    proc = KvmeshProcess(args, name=name)
    proc.wait_ready(timeout)
    return proc


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    workdir = Path(tmp_path_factory.mktemp("kv-events"))
    model = tiny_model()
    events_port, replay_port = free_port(), free_port()
    procs: list[KvmeshProcess] = []
    vllm: VllmServer | None = None
    try:
        metadata = start(["metadata", "--listen", "127.0.0.1:0", "--backend", "memory://?sweep_ms=50"], "metadata")
        procs.append(metadata)
        router_args = ["router", "--listen", "127.0.0.1:0", "--metadata", str(metadata.address), "--no-register-self",
                       "--block-size", str(BLOCK_SIZE), "--policy", "prefix",
                       "--kv-events-listen", f"tcp://127.0.0.1:{events_port}",
                       "--tokenizer", f"{MODEL_NAME}={model}"]
        router = start(router_args, "router")
        procs.append(router)
        scene = Scene(workdir, metadata, router, None, None, events_port, replay_port, router_args)  # type: ignore[arg-type]
        vllm = scene.vllm = scene.start_vllm()
        agent = start(["agent", "--engine-url", vllm.url, "--metadata", str(metadata.address), "--member-id", MEMBER,
                       "--kv-events-replay", f"tcp://127.0.0.1:{replay_port}", "--ttl-seconds", str(TTL),
                       "--poll-interval-seconds", "0.5"], "agent")
        procs.append(agent)
        scene.agent = agent
        yield scene
        vllm = scene.vllm
        procs = [scene.metadata, scene.router, scene.agent]
    finally:
        if vllm is not None:
            vllm.kill()
        for proc in reversed(procs):
            proc.kill()
            proc.close()


def test_agent_registers_the_pod(scene: Scene) -> None:
    members = wait_for(scene.members, 60, "the engine member")
    (m,) = members
    assert (m.id, m.model, m.address) == (MEMBER, MODEL_NAME, scene.vllm.address)
    assert m.labels["kv-events-replay"] == f"tcp://127.0.0.1:{scene.replay_port}"
    wait_for(lambda: scene.stats().members == 1, 30, "the router to see the pod")


def test_router_holds_the_blocks_of_a_request(scene: Scene) -> None:
    tokens = prompt(100)
    assert scene.matched(tokens) == 0
    scene.vllm.complete(tokens, max_tokens=4)
    wait_for(lambda: scene.matched(tokens) == 3, 30, "the request's 3 blocks in the tree")
    # A gateway without a tokenizer sends text to both: the router tokenizes it with the model's
    # tokenizer.json (--tokenizer) exactly as vLLM does, so the text route matches vLLM's blocks.
    text = words(list(range(500, 600)))
    scene.vllm.complete(text, max_tokens=4)
    wait_for(lambda: scene.route(text=text).matched_blocks >= 3, 30, "the text's blocks")
    by_text = scene.route(text=text)
    assert by_text.member_id == MEMBER and by_text.matched_blocks == by_text.total_blocks
    assert scene.stats().kv_event_blocks >= 3


def test_evicted_blocks_leave_the_tree(scene: Scene) -> None:
    first = prompt(200)
    scene.vllm.complete(first, max_tokens=4)
    wait_for(lambda: scene.matched(first) == 3, 30, "the first prompt's blocks")
    for i in range(6):  # 16 KV blocks in all: these push the first prompt out
        scene.vllm.complete(prompt(300 + 100 * i), max_tokens=4)
    last = prompt(800)
    wait_for(lambda: scene.matched(last) == 3, 30, "the last prompt's blocks")
    wait_for(lambda: scene.matched(first) < 3, 30, "the evicted blocks to leave")


def test_reset_prefix_cache_clears_the_pod(scene: Scene) -> None:
    kept = prompt(800)
    assert scene.matched(kept) == 3
    scene.vllm.post("/reset_prefix_cache")
    scene.vllm.complete(prompt(50, 1), max_tokens=2)  # AllBlocksCleared goes out on the next step
    wait_for(lambda: scene.matched(kept) == 0, 30, "every block to go")


def test_events_while_the_router_is_down_come_back_by_replay(scene: Scene) -> None:
    scene.router.kill()
    scene.router.close()
    burst = [prompt(10 + 100 * i, 2) for i in range(3)]
    for tokens in burst:
        scene.vllm.complete(tokens, max_tokens=2)
    scene.router = start(scene.router_args, "router-2")
    wait_for(lambda: scene.stats().members == 1, 30, "the new router to see the pod")
    wait_for(lambda: scene.stats().warm, 30, "the new router to be warm")
    for tokens in burst:
        wait_for(partial(held, scene, tokens, 2), 30, "blocks stored while the router was down")
    assert scene.stats().kv_event_replays >= 1


def test_killed_vllm_leaves_within_the_ttl_and_no_stale_block_remains(scene: Scene) -> None:
    old = prompt(400)
    scene.vllm.complete(old, max_tokens=2)
    wait_for(lambda: scene.matched(old) == 3, 30, "the old blocks")
    scene.vllm.kill()
    killed = time.monotonic()
    wait_for(lambda: not scene.members(), TTL + 2, "the engine to leave the mesh", interval=0.1)
    assert time.monotonic() - killed <= TTL + 2
    scene.vllm = scene.start_vllm(scene.vllm.port)
    wait_for(scene.members, 60, "the agent to register the restarted engine")
    wait_for(lambda: scene.stats().members == 1, 30, "the router to see it again")
    assert scene.matched(old) == 0
    new = prompt(600)
    scene.vllm.complete(new, max_tokens=2)
    wait_for(lambda: scene.matched(new) == 3, 30, "the restarted engine's blocks")
    assert scene.matched(old) == 0
