"""A crafted vLLM-style KV-event publisher for the router's tests: a real ZMQ PUB and replay ROUTER.

Frames and payloads follow vLLM's wire format: `[topic, seq (8 bytes big-endian), msgpack([ts,
[events], dp_rank])]`, events as tagged maps or positional arrays; the replay socket answers
`[b"", start_seq]` with `[b"", topic, seq, payload]` per batch and an end marker of 8 bytes of 0xff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

END = b"\xff" * 8


def stored(hashes: list[Any], parent: Any, tokens: list[int], block_size: int, encoding: str = "map",
           medium: str | None = None) -> Any:
    if encoding == "map":
        event: dict[str, Any] = {"type": "BlockStored", "block_hashes": hashes, "token_ids": tokens,
                                 "block_size": block_size, "future_field": {"x": 1}}
        if parent is not None:
            event["parent_block_hash"] = parent
        if medium is not None:
            event["medium"] = medium
        return event
    return ["BlockStored", hashes, parent, tokens, block_size, None, medium, None, None]


def removed(hashes: list[Any], encoding: str = "map", medium: str | None = None) -> Any:
    if encoding == "map":
        event: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": hashes}
        if medium is not None:
            event["medium"] = medium
        return event
    return ["BlockRemoved", hashes, medium]


def cleared(encoding: str = "map") -> Any:
    return {"type": "AllBlocksCleared"} if encoding == "map" else ["AllBlocksCleared"]


class Publisher:
    """One fake engine: publishes batches with sequence numbers and keeps them for replay."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes, *, connect: str = "", bind: str = "",
                 replay_bind: str = "tcp://127.0.0.1:0") -> None:
        self.topic = topic
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if connect:
            self.pub.connect(connect)
        if bind:
            self.pub.bind(bind)
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT) if bind else connect
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.LINGER, 0)
        for attempt in range(50):  # a just-closed socket may hold the port for a moment
            try:
                self.replay.bind(replay_bind)
                break
            except zmq.ZMQError:
                if attempt == 49:
                    raise
                time.sleep(0.05)
        self.replay_endpoint = self.replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self.history: list[tuple[int, bytes]] = []
        self.seq = 0
        self.replays = 0
        self._task = asyncio.create_task(self._serve_replay())

    def batch(self, events: list[Any], send: bool = True, ts: float | None = None) -> int:
        """Publishes one batch (or only records it, as if the subscriber missed it). Returns its seq."""
        payload = msgpack.packb([time.time() if ts is None else ts, events, 0])
        seq = self.seq
        self.seq += 1
        self.history.append((seq, payload))
        if send:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def raw(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    async def _serve_replay(self) -> None:
        while True:
            frames = await self.replay.recv_multipart()
            ident, start = frames[0], int.from_bytes(frames[-1], "big")
            self.replays += 1
            for seq, payload in self.history:
                if seq >= start:
                    await self.replay.send_multipart([ident, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await self.replay.send_multipart([ident, b"", self.topic, END, b""])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.pub.close(0)
        self.replay.close(0)
