"""Receives vLLM KV events over ZMQ and feeds them, in order and in small slices, to the tree.

Two modes (both may run at once):
- central: one SUB socket bound on `--kv-events-listen`; every vLLM connects to it and the
  topic `kv@<member-id>@<model>` names the pod;
- per pod: for each engine member whose labels announce `kv-events`, a SUB socket connected to
  that publisher (closed as soon as the member leaves).

Receivers only put `(member, seq, payload)` on one bounded queue (a full queue drops the batch:
the next batch shows the gap and a replay fetches it). One consumer decodes and applies, in
slices of at most `--kv-events-slice-blocks` blocks; the in-order batches of one pod waiting in
the queue are applied together (up to `GATHER_BATCHES`), so a storm of small batches costs the
tree one chain per run of chained events, not one per batch. Both work for at most `--kv-events-turn-ms`
per event-loop turn and then yield, so routing never waits long behind a storm: the budget is
time, not a count, because a message or a block costs very different times on different
machines. Receivers drain their socket with plain non-blocking reads (one asyncio future per
wake-up, not per message: a future per message cost about 140 µs of loop time each here), and
payloads over `--kv-events-decode-inline-bytes` are decoded in a worker thread. Replays (a gap,
a restarted engine, a pod seen for the first time) ask the
engine's `kv-events-replay` ROUTER socket for everything from a sequence number on; a router
that starts next to running engines rebuilds its view this way and reports `warm` once every
engine with a replay endpoint has been caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from kvmesh.membership import MembershipChange
from kvmesh.services.router.core import RouterCore
from kvmesh.services.router.kv_events.decode import DecodeError, EngineEvent, EventBatch, decode_batch
from kvmesh.services.router.kv_events.exposure import warn_if_exposed
from kvmesh.services.router.kv_events.ingest import EventIngest, PodStream, Verdict, engine_slices
from kvmesh.services.router.settings import RouterSettings
from kvmesh.tasks import cancel_and_wait

log = logging.getLogger("kvmesh.router.kv_events")

EVENTS_LABEL = "kv-events"
REPLAY_LABEL = "kv-events-replay"
END_OF_REPLAY = b"\xff" * 8
_SYNC = -1  # queue item: catch this pod up through its replay endpoint
GATHER_BATCHES = 64  # queued batches of one pod decoded and applied as one


def member_of_topic(topic: bytes) -> str | None:
    """`kv@<member-id>@<model>` → member id (None when the topic names no pod)."""
    parts = topic.decode("utf-8", "replace").split("@")
    return parts[1] if len(parts) >= 2 and parts[1] else None


@dataclass
class SubscriberStats:
    received: int = 0
    dropped: int = 0  # queue full or malformed frames: recovered by replay when possible
    malformed: int = 0
    replays: int = 0
    replay_failures: int = 0
    restarts: int = 0


class KvEventSubscriber:
    """ZMQ subscribers and the one consumer that applies their batches to `core`."""

    def __init__(self, core: RouterCore, settings: RouterSettings) -> None:
        self.core = core
        self.settings = settings
        self.ingest = EventIngest(core, settings.kv_events_max_blocks_per_pod)
        self.stats = SubscriberStats()
        self._queue: asyncio.Queue[tuple[str, int, bytes]] = asyncio.Queue(settings.kv_events_queue)
        self._pending_sync: set[str] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._central: asyncio.Task[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._receivers: dict[str, tuple[str, asyncio.Task[None]]] = {}  # member → (endpoint, task)
        self.bound_endpoint = ""
        self._budget = settings.kv_events_turn_ms / 1000.0
        self._turn = 0.0  # when the consumer's current event-loop turn began
        self._next: tuple[str, int, bytes] | None = None  # taken from the queue, not yet handled

    async def _pause(self) -> None:
        """Yields to the event loop once the consumer has used its budget for this turn."""
        now = time.perf_counter()
        if now - self._turn >= self._budget:
            await asyncio.sleep(0)
            self._turn = time.perf_counter()

    # ---- lifecycle ---------------------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.kv_events_max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, self.settings.kv_events_queue)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._ctx = zmq.asyncio.Context()
        if self.settings.kv_events_listen:
            sock = self._socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.bind(self.settings.kv_events_listen)
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            warn_if_exposed(self.settings.kv_events_listen, self.settings.security_policy is not None)
            self._central = asyncio.create_task(self._receive(sock, None), name="kv-events-central")
        self._consumer = asyncio.create_task(self._consume(), name="kv-events-consumer")
        for pod in list(self.core.pods.by_id.values()):
            self._follow(pod.member_id, pod.labels, joined=True)

    async def close(self) -> None:
        tasks = [t for _, t in self._receivers.values()]
        self._receivers.clear()
        for task in (self._central, self._consumer, *tasks):
            if task is not None:
                await cancel_and_wait(task)
        self._central = self._consumer = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # ---- membership --------------------------------------------------------------------------
    def update_pods(self, change: MembershipChange) -> None:
        """Called after the core applied a membership diff: follow joiners, forget leavers now."""
        for member in change.left:
            self.ingest.forget(member.id)
            self._pending_sync.discard(member.id)
            entry = self._receivers.pop(member.id, None)
            if entry is not None:
                entry[1].cancel()
        for member in change.joined:
            self._follow(member.id, dict(member.labels), joined=True)
        for member in change.updated:
            self._follow(member.id, dict(member.labels), joined=False)

    def _follow(self, member_id: str, labels: dict[str, str], joined: bool) -> None:
        endpoint = labels.get(EVENTS_LABEL, "")
        current = self._receivers.get(member_id)
        connect = self.settings.kv_events_connect and self._ctx is not None and endpoint
        if connect and (current is None or current[0] != endpoint):
            if current is not None:
                current[1].cancel()
            try:
                sock = self._socket(zmq.SUB)
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                log.warning("cannot subscribe to %s of %s: %s", endpoint, member_id, exc)
            else:
                task = asyncio.create_task(self._receive(sock, member_id), name=f"kv-events-{member_id}")
                self._receivers[member_id] = (endpoint, task)
        if joined and labels.get(REPLAY_LABEL) and not self.ingest.stream(member_id).synced:
            self._request_sync(member_id)

    def _request_sync(self, member_id: str) -> None:
        try:
            self._queue.put_nowait((member_id, _SYNC, b""))
        except asyncio.QueueFull:
            self._pending_sync.add(member_id)

    # ---- warm index ----------------------------------------------------------------------------
    def warm(self) -> bool:
        """Every engine with a replay endpoint has been caught up with it at least once."""
        for pod in self.core.pods.by_id.values():
            if pod.labels.get(REPLAY_LABEL):
                stream = self.ingest.streams.get(pod.member_id)
                if stream is None or not stream.synced:
                    return False
        return True

    # ---- receiving -----------------------------------------------------------------------------
    def offer(self, member_id: str, seq: int, payload: bytes) -> bool:
        """Queues one received batch for the consumer; False when the queue is full (dropped:
        the next batch shows the gap and a replay fetches this one)."""
        try:
            self._queue.put_nowait((member_id, seq, payload))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            return False
        return True

    async def _receive(self, sock: zmq.asyncio.Socket, member_id: str | None) -> None:
        stats = self.stats
        budget = self._budget
        # The same ZMQ socket seen synchronously: once woken, drain it with non-blocking reads.
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        try:
            while True:
                await sock.poll()  # readable (POLLIN), no timeout
                started = time.perf_counter()
                while True:
                    try:
                        frames = plain.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    stats.received += 1
                    mid = member_id or (member_of_topic(frames[0]) if frames else None)
                    if len(frames) != 3 or len(frames[1]) != 8 or mid is None:
                        stats.malformed += 1
                    else:
                        self.offer(mid, int.from_bytes(frames[1], "big"), frames[2])
                    if time.perf_counter() - started >= budget:
                        await asyncio.sleep(0)  # a flood must not hold the loop while it is received
                        started = time.perf_counter()
        finally:
            sock.close(linger=0)

    async def _take(self) -> tuple[str, int, bytes]:
        if self._next is not None:
            item, self._next = self._next, None
            return item
        if self._queue.empty():
            item = await self._queue.get()
            self._turn = time.perf_counter()
            return item
        await self._pause()
        return self._queue.get_nowait()

    def _gather(self, member_id: str, first: tuple[int, bytes]) -> list[tuple[int, bytes]]:
        """`first` and the batches of the same pod right behind it in the queue."""
        run = [first]
        queue = self._queue
        while len(run) < GATHER_BATCHES and not queue.empty():
            item = queue.get_nowait()
            if item[0] != member_id or item[1] == _SYNC:
                self._next = item  # handled next, in its turn
                break
            run.append(item[1:])
        return run

    async def _consume(self) -> None:
        while True:
            member_id, seq, payload = await self._take()
            try:
                if seq == _SYNC:
                    await self._sync(member_id)
                else:
                    await self._handle(member_id, self._gather(member_id, (seq, payload)))
                while self._pending_sync:
                    await self._sync(self._pending_sync.pop())
            except (zmq.ZMQError, OSError):
                log.warning("KV events of %s: transport error", member_id, exc_info=True)

    async def _decode(self, payload: bytes) -> EventBatch | None:
        try:
            if len(payload) > self.settings.kv_events_decode_inline_bytes:
                batch = await asyncio.to_thread(decode_batch, payload)  # a big prefill's tokens
            else:
                batch = decode_batch(payload)
        except DecodeError as exc:
            self.stats.malformed += 1
            self.ingest.counters.ignored += 1
            self.ingest.counters.last_ignored = str(exc)
            return None
        self.ingest.counters.ignored += batch.ignored
        return batch

    async def _handle(self, member_id: str, batches: list[tuple[int, bytes]]) -> None:
        """One pod's batches in queue order: the in-order ones are applied together."""
        if member_id not in self.core.pods:
            self.ingest.counters.ignored += len(batches)
            self.ingest.counters.last_ignored = f"events of unknown engine {member_id!r}"
            return
        stream = self.ingest.stream(member_id)
        pending: list[EngineEvent] = []  # of in-order batches, already counted in `stream`
        for seq, payload in batches:
            await self._pause()
            batch = await self._decode(payload)
            if batch is None or member_id not in self.core.pods:  # (it may leave while a thread decodes)
                continue
            verdict = stream.verdict(seq, batch.ts)
            if verdict is Verdict.RESTART:
                await self._apply_events(member_id, pending)  # what came before, first
                pending = []
                self.stats.restarts += 1
                self.ingest.restart(member_id)
                verdict = Verdict.FIRST
            if verdict is Verdict.NEXT or (verdict is Verdict.FIRST and seq == 0):
                if verdict is Verdict.FIRST:
                    stream.synced = True  # seq 0: the engine's whole history is ahead of us
                pending.extend(batch.events)
                self._advance(stream, seq, batch)
                continue
            await self._apply_events(member_id, pending)  # what came before, first
            pending = []
            if verdict is Verdict.DUPLICATE:
                continue
            if await self._replay(member_id, stream, stream.seq + 1) and stream.seq >= seq:
                continue  # the replay brought this batch too
            await self._apply(member_id, stream, seq, batch)
        await self._apply_events(member_id, pending)

    @staticmethod
    def _advance(stream: PodStream, seq: int, batch: EventBatch) -> None:
        stream.seq = seq
        stream.ts = batch.ts
        stream.batches += 1

    async def _apply_events(self, member_id: str, events: list[EngineEvent]) -> None:
        for piece in engine_slices(events, self.settings.kv_events_slice_blocks):
            await self._pause()  # let routes run once this turn's budget is used
            self.ingest.apply(member_id, piece)

    async def _apply(self, member_id: str, stream: PodStream, seq: int, batch: EventBatch) -> None:
        await self._apply_events(member_id, batch.events)
        self._advance(stream, seq, batch)

    async def _sync(self, member_id: str) -> None:
        if member_id not in self.core.pods:
            return  # left before its turn came: nothing to keep for it
        stream = self.ingest.stream(member_id)
        if not stream.synced:
            await self._replay(member_id, stream, stream.seq + 1)

    async def _replay(self, member_id: str, stream: PodStream, start: int) -> bool:
        """Applies the engine's buffered batches from `start` on; False when it cannot be asked."""
        pod = self.core.pods.get(member_id)
        endpoint = pod.labels.get(REPLAY_LABEL, "") if pod is not None else ""
        if not endpoint or self._ctx is None:
            return False
        sock = self._socket(zmq.DEALER)
        timeout = self.settings.kv_events_replay_timeout_seconds
        try:
            sock.connect(endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            for _ in range(self.settings.kv_events_replay_max_batches):
                frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
                if frames and not frames[0]:
                    frames = frames[1:]  # the empty delimiter
                if len(frames) < 2 or len(frames[1]) != 8:
                    self.stats.malformed += 1
                    continue
                if frames[1] == END_OF_REPLAY:
                    break
                seq = int.from_bytes(frames[1], "big")
                if seq <= stream.seq or len(frames) < 3:
                    continue
                batch = await self._decode(frames[2])
                if batch is not None:
                    await self._apply(member_id, stream, seq, batch)
            stream.synced = True
            stream.replays += 1
            self.stats.replays += 1
            return True
        except (TimeoutError, zmq.ZMQError) as exc:
            self.stats.replay_failures += 1
            log.warning("replay from %s for %s failed: %r", endpoint, member_id, exc)
            return False
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=0)
