"""vLLM KV events over ZMQ into a running router (in process): real ZMQ sockets, crafted frames in
both encodings, replay on gaps, engine restarts, leaving engines, mediums, bad input, warm-up."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.membership import MemberSession
from kvmesh.services.router.kv_events.decode import EngineCleared, EngineRemoved, EngineStored, decode_batch
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import common_pb2, router_pb2
from tests.router.conftest import Mesh
from tests.router.kv_publisher import Publisher, cleared, removed, stored

pytestmark = pytest.mark.timeout(60)

BS = 4  # router --block-size in these tests
MODEL = "m"


def tokens(start: int, blocks: int) -> list[int]:
    return list(range(start, start + blocks * BS))


def packed(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def test_decode_both_encodings_defaults_and_unknowns() -> None:
    payload = msgpack.packb([
        12.5,
        [
            {"type": "BlockStored", "block_hashes": [7, 8], "token_ids": tokens(0, 2), "block_size": BS,
             "lora_name": None, "ownership": "x"},
            ["BlockStored", [b"\x01" * 32], b"\x02" * 32, tokens(8, 1), BS, None, "CPU", None, None, 0, "full"],
            {"type": "BlockRemoved", "block_hashes": [8], "medium": "GPU"},
            ["BlockRemoved", [9]],
            {"type": "AllBlocksCleared"},
            {"type": "SomethingNew", "x": 1},
            ["BlockStored", "not a list"],
        ],
        0,
    ])
    batch = decode_batch(payload)
    assert batch.ts == 12.5
    assert batch.events == [
        EngineStored([7, 8], None, packed(tokens(0, 2)), BS, "GPU"),
        EngineStored([b"\x01" * 32], b"\x02" * 32, packed(tokens(8, 1)), BS, "CPU"),
        EngineRemoved([8], "GPU"),
        EngineRemoved([9], "GPU"),
        EngineCleared(),
    ]
    assert batch.ignored == 2


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


async def join(mesh: Mesh, member_id: str, labels: dict[str, str]) -> MemberSession:
    m = common_pb2.Member(id=member_id, role=common_pb2.ROLE_ENGINE, address="127.0.0.1:9", model=MODEL,
                          labels=labels)
    session = MemberSession([mesh.metadata_address], m, ttl_seconds=5)
    await session.start()
    await session.wait_registered(10)
    mesh.sessions[member_id] = session
    await mesh.wait_members(lambda ids: member_id in ids)
    return session


async def matched(mesh: Mesh, toks: list[int]) -> tuple[str, int]:
    r = await mesh.stub.Route(router_pb2.RouteRequest(model=MODEL, tokens=router_pb2.TokenIds(ids=toks)))
    await mesh.stub.Release(router_pb2.ReleaseRequest(request_id=r.request_id))
    return r.member_id, r.matched_blocks


async def until_matched(mesh: Mesh, toks: list[int], member_id: str, blocks: int) -> None:
    async def check() -> bool:
        got = await matched(mesh, toks)
        return got == (member_id, blocks) if blocks else got[1] == 0
    await eventually(check, timeout=10, interval=0.05, what=f"{member_id} matching {blocks} blocks")


async def connected(mesh: Mesh, pub: Publisher) -> None:
    """Publishes empty batches until the router receives one: a PUB drops what it sends before
    the subscriber's subscription reaches it (a lost batch is otherwise only noticed at the next)."""
    kv = mesh.service.kv_events

    async def check() -> bool:
        if kv.stats.received:
            return True
        pub.batch([])
        return False

    await eventually(check, timeout=10, interval=0.05, what="the router to receive from the publisher")


@pytest.fixture
async def central(mesh_factory: Callable[..., Any]) -> Mesh:
    port = free_port()
    mesh: Mesh = await mesh_factory(block_size=BS, kv_events_listen=f"tcp://127.0.0.1:{port}",
                                    policy="prefix", kv_events_replay_timeout_seconds=1.0)
    return mesh


@pytest.mark.parametrize("encoding,hashes", [("map", [11, 12, 13]), ("array", [b"a" * 32, b"b" * 32, b"c" * 32])])
async def test_central_mode_keeps_the_tree_exact(central: Mesh, zctx: zmq.asyncio.Context, encoding: str,
                                                 hashes: list[Any]) -> None:
    listen = central.service.kv_events.bound_endpoint
    pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=listen)
    try:
        await join(central, "e1", {"kv-events-replay": pub.replay_endpoint})
        await join(central, "e2", {})
        await connected(central, pub)
        pub.batch([stored(hashes[:2], None, tokens(0, 2), BS, encoding)])
        pub.batch([stored(hashes[2:], hashes[1], tokens(8, 1), BS, encoding)])
        prompt = tokens(0, 3) + [999] * BS
        await until_matched(central, prompt, "e1", 3)  # same ids as a route computes from tokens
        pub.batch([removed(hashes[2:], encoding)])
        await until_matched(central, prompt, "e1", 2)
        pub.batch([cleared(encoding)])
        await until_matched(central, prompt, "", 0)
        stats = await central.stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.kv_event_blocks == 3 and stats.warm
    finally:
        await pub.close()


async def test_gap_is_replayed_and_restart_drops_old_blocks(central: Mesh, zctx: zmq.asyncio.Context) -> None:
    listen = central.service.kv_events.bound_endpoint
    pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=listen)
    try:
        await join(central, "e1", {"kv-events-replay": pub.replay_endpoint})
        await connected(central, pub)
        pub.batch([stored([1], None, tokens(0, 1), BS)])
        await until_matched(central, tokens(0, 1), "e1", 1)
        pub.batch([stored([2], 1, tokens(4, 1), BS)], send=False)  # lost on the way
        pub.batch([stored([3], 2, tokens(8, 1), BS)])
        await until_matched(central, tokens(0, 3), "e1", 3)  # the gap was fetched by replay
        assert pub.replays >= 1
        replay = pub.replay_endpoint
        await pub.close()
        # The engine restarts: sequence from 0 again, newer timestamps, an empty cache.
        pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=listen, replay_bind=replay)
        await asyncio.sleep(0.3)  # a fresh PUB drops what it sends before the subscription arrives
        for _ in range(3):
            pub.batch([])
        pub.batch([stored([50], None, tokens(100, 1), BS)])
        await until_matched(central, tokens(100, 1), "e1", 1)
        assert (await matched(central, tokens(0, 3)))[1] == 0  # nothing stale survives the restart
        stats = await central.stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.kv_event_restarts >= 1 or stats.kv_event_replays >= 2
    finally:
        await pub.close()


async def test_engine_that_leaves_is_forgotten_and_mediums_count(central: Mesh, zctx: zmq.asyncio.Context) -> None:
    listen = central.service.kv_events.bound_endpoint
    pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=listen)
    try:
        await join(central, "e1", {"kv-events-replay": pub.replay_endpoint})
        await join(central, "e2", {})
        await connected(central, pub)
        pub.batch([stored([1, 2], None, tokens(0, 2), BS, medium="GPU")])
        pub.batch([stored([1, 2], None, tokens(0, 2), BS, medium="CPU")])
        pub.batch([removed([2], medium="GPU")])
        pub.batch([stored([9], None, tokens(40, 1), BS)])  # a marker: every batch before it is applied
        await until_matched(central, tokens(40, 1), "e1", 1)
        assert await matched(central, tokens(0, 2)) == ("e1", 2)  # block 2 still on CPU: still a hit
        pub.batch([removed([2], medium="CPU")])
        await until_matched(central, tokens(0, 2), "e1", 1)
        await central.leave("e1")
        await central.wait_members(lambda ids: ids == {"e2"})
        # Its event stream is dropped at once and it is never routed to while e2 lives. Its tree
        # is kept only for the rejoin grace window (a metadata flicker must not cost it).
        assert "e1" not in central.service.kv_events.ingest.streams
        stats = await central.stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.members_in_grace == 1
        assert (await matched(central, tokens(0, 2)))[0] == "e2"
        central.service.core.expire_departed(now=float("inf"))
        assert (await central.stub.Stats(router_pb2.RouterStatsRequest())).members_in_grace == 0
        assert "e1" not in central.service.core.pods.by_id  # its tree went with it
    finally:
        await pub.close()


@pytest.mark.parametrize("encoding", ["map", "array"])
async def test_mediums_weigh_in_routing_end_to_end(central: Mesh, zctx: zmq.asyncio.Context, encoding: str) -> None:
    """Two pods over ZMQ in vLLM's encodings: e1 holds 2 blocks in GPU memory, e2 holds 3 that an
    offloading engine moved to CPU (stored on GPU, copied to CPU, evicted from GPU). At the
    default weights (GPU 1, CPU 0.5) e1's 2 beat e2's 1.5; once e2 loads them back, e2 wins."""
    listen = central.service.kv_events.bound_endpoint
    pub1 = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=listen)
    pub2 = Publisher(zctx, f"kv@e2@{MODEL}".encode(), connect=listen)
    try:
        await join(central, "e1", {})
        await join(central, "e2", {})
        kv = central.service.kv_events
        for pub in (pub1, pub2):
            seen = kv.stats.received

            async def check(pub: Publisher = pub, seen: int = seen) -> bool:
                if kv.stats.received > seen:
                    return True
                pub.batch([])
                return False

            await eventually(check, timeout=10, interval=0.05, what="the router to receive from the publisher")
        h1, h2 = ([11, 12], [21, 22, 23]) if encoding == "map" else ([b"\x01" * 32, b"\x02" * 32],
                                                                    [b"\x03" * 32, b"\x04" * 32, b"\x05" * 32])
        pub1.batch([stored(h1, None, tokens(0, 2), BS, encoding)])  # no medium: GPU
        pub2.batch([stored(h2, None, tokens(0, 3), BS, encoding, medium="GPU")])
        pub2.batch([stored(h2, None, tokens(0, 3), BS, encoding, medium="CPU")])
        pub2.batch([removed(h2, encoding, medium="GPU")])
        pub2.batch([stored([29 if encoding == "map" else b"m" * 32], None, tokens(90, 1), BS, encoding)])
        prompt = tokens(0, 3) + [999] * BS
        await until_matched(central, tokens(90, 1), "e2", 1)  # a marker: e2's batches are applied
        assert await matched(central, prompt) == ("e1", 2)  # 2 GPU blocks beat 3 CPU-only ones
        pub2.batch([stored(h2, None, tokens(0, 3), BS, encoding, medium="GPU")])  # loaded back
        await until_matched(central, prompt, "e2", 3)
        pub2.batch([removed(h2, encoding, medium="GPU")])
        await until_matched(central, prompt, "e1", 2)
        pub2.batch([removed(h2, encoding, medium="CPU")])  # the last copy goes: e2 holds nothing
        pub1.batch([removed(h1, encoding)])
        await until_matched(central, prompt, "", 0)
    finally:
        await pub1.close()
        await pub2.close()


async def test_storm_and_big_payloads_leave_room_for_routes(mesh_factory: Callable[..., Any],
                                                          zctx: zmq.asyncio.Context) -> None:
    """A flood of ZMQ batches and one big payload (decoded in a worker thread: over
    --kv-events-decode-inline-bytes) are applied whole and in order, while `Route` keeps answering."""
    port = free_port()
    # share_weight 0: the probe routes during the storm all go to e1, and the share rule would
    # then (rightly) send the final check elsewhere however many blocks e1 holds.
    mesh: Mesh = await mesh_factory(block_size=BS, kv_events_listen=f"tcp://127.0.0.1:{port}", policy="prefix",
                                    kv_events_decode_inline_bytes=4096, kv_events_slice_blocks=64,
                                    kv_events_queue=10_000, share_weight=0.0)
    pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=mesh.service.kv_events.bound_endpoint)
    try:
        await join(mesh, "e1", {})
        await join(mesh, "e2", {})
        await connected(mesh, pub)
        big = 3000  # blocks in one event: 12,000 tokens, about 30 KiB of msgpack
        pub.batch([stored(list(range(1, big + 1)), None, tokens(0, big), BS)])
        for i in range(6000):  # then small batches, each chaining one block on the big run
            pub.batch([stored([100_000 + i], 1 + (i * 7) % big, [60_000 + i] * BS, BS)])
        kv = mesh.service.kv_events
        routed_during = 0
        while kv.ingest.counters.stored_blocks < big + 6000:
            await matched(mesh, tokens(0, 2))
            routed_during += 1
            assert routed_during < 100_000
        assert routed_during >= 5, "routing waited behind the whole storm"
        assert await matched(mesh, tokens(0, 64)) == ("e1", 64)
        assert kv.ingest.counters.ignored == 0 and kv.stats.dropped == 0
    finally:
        await pub.close()


async def test_bad_frames_are_counted_and_nothing_breaks(central: Mesh, zctx: zmq.asyncio.Context) -> None:
    listen = central.service.kv_events.bound_endpoint
    pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=listen)
    try:
        await join(central, "e1", {})
        await connected(central, pub)
        pub.raw([b"kv@e1@m", b"short", b"x"])
        pub.raw([b"no-member", (0).to_bytes(8, "big"), b"x"])
        pub.raw([b"kv@e1@m", (0).to_bytes(8, "big"), b"\xc1 not msgpack"])
        pub.raw([b"kv@e1@m", (1).to_bytes(8, "big"), msgpack.packb({"ts": 1})])
        pub.raw([b"kv@ghost@m", (0).to_bytes(8, "big"), msgpack.packb([1.0, [], 0])])
        pub.batch([stored([1], None, tokens(0, 1), BS), stored([5], 404, tokens(4, 1), BS),
                   stored([6], None, [1, 2, 3], BS), stored([7], None, tokens(0, 2), 2 * BS)])
        await until_matched(central, tokens(0, 1), "e1", 1)
        kv = central.service.kv_events
        assert kv.stats.malformed >= 3
        assert kv.ingest.counters.ignored >= 4
    finally:
        await pub.close()


async def test_per_pod_mode_and_a_new_router_warms_up_from_replay(mesh_factory: Callable[..., Any],
                                                                   zctx: zmq.asyncio.Context) -> None:
    # The engine published before any router existed; the router connects to its `kv-events`
    # label and rebuilds its view from the replay endpoint.
    pub = Publisher(zctx, b"kv", bind="tcp://127.0.0.1:0")
    try:
        pub.batch([stored([1, 2], None, tokens(0, 2), BS)])
        pub.batch([stored([3], 2, tokens(8, 1), BS)])
        mesh: Mesh = await mesh_factory(block_size=BS, policy="prefix")
        await join(mesh, "e1", {"kv-events": pub.endpoint, "kv-events-replay": pub.replay_endpoint})
        await join(mesh, "e2", {})
        await until_matched(mesh, tokens(0, 3), "e1", 3)
        stats = await mesh.stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.warm and stats.kv_event_replays >= 1
        health = health_pb2_grpc.HealthStub(mesh.handle.channel(mesh.router_address))

        async def ready() -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Router.warm"))
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(ready, timeout=10, interval=0.1, what="readiness kvmesh.v1.Router.warm")
        await asyncio.sleep(0.3)  # let the SUB connection settle, then live events flow too
        pub.batch([stored([4], 3, tokens(12, 1), BS)])
        await until_matched(mesh, tokens(0, 4), "e1", 4)
    finally:
        await pub.close()


async def test_tokenizer_lets_text_match_event_blocks(mesh_factory: Callable[..., Any], zctx: zmq.asyncio.Context,
                                                      tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(100)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    port = free_port()
    mesh: Mesh = await mesh_factory(block_size=BS, kv_events_listen=f"tcp://127.0.0.1:{port}",
                                    tokenizer=f"{MODEL}={tmp_path}", tokenize_inline_chars=10)
    pub = Publisher(zctx, f"kv@e1@{MODEL}".encode(), connect=mesh.service.kv_events.bound_endpoint)
    try:
        await join(mesh, "e1", {"kv-events-replay": pub.replay_endpoint})
        await join(mesh, "e2", {})
        await connected(mesh, pub)
        pub.batch([stored([1, 2], None, tokens(0, 2), BS)])
        await until_matched(mesh, tokens(0, 2), "e1", 2)
        text = " ".join(f"w{i}" for i in [*tokens(0, 2), 50, 51])
        r = await mesh.stub.Route(router_pb2.RouteRequest(model=MODEL, text=text))
        assert (r.member_id, r.matched_blocks, r.total_blocks) == ("e1", 2, 2)
        other = await mesh.stub.Route(router_pb2.RouteRequest(model="other", text=text))
        assert other.matched_blocks == 0  # no tokenizer for that model: text blocks
    finally:
        await pub.close()
        with contextlib.suppress(Exception):
            await mesh.stub.Stats(router_pb2.RouterStatsRequest())


def test_tokenizer_flag_is_checked_at_startup(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from kvmesh.services.router.settings import RouterSettings

    (tmp_path / "tokenizer.json").write_text("{}")
    assert RouterSettings(tokenizer=f"a={tmp_path}, b={tmp_path / 'tokenizer.json'}").tokenizer_paths == {
        "a": str(tmp_path), "b": str(tmp_path / "tokenizer.json")}
    for bad in ("no-equals", "=path", f"m={tmp_path / 'missing'}"):
        with pytest.raises(ValidationError):
            RouterSettings(tokenizer=bad)
