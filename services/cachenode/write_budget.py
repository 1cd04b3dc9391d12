"""Bounds on what incoming writes may hold before their values are stored.

A value that arrives in several chunks is held by the node until its last byte is in
(nothing is reserved and nothing evicted for bytes that have not arrived). What a stream
holds (chunks of its unfinished value, and whole values waiting in its write batch) is
counted here against three byte bounds: per stream, per connection (gRPC peer) and for the
whole node; streams are counted per connection and in total. A chunk that would go over a
byte bound fails its value with RESOURCE_EXHAUSTED (the stream goes on); a stream over the
stream-count bounds is refused at once. Everything runs on the event loop: no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.units import format_size


@dataclass(frozen=True)
class WriteBounds:
    """What incoming writes may hold (flags in settings.py, rows in docs/limits.md)."""

    stream_bytes: int = 256 * 1024**2 + 32 * 1024**2  # --max-value-bytes + one write batch
    peer_bytes: int = 512 * 1024**2
    total_bytes: int = 1024**3
    peer_streams: int = 64
    streams: int = 1024
    idle_timeout_s: float = 30.0


class WriteBudget:
    """The node's account of held bytes and open streams; `open` one `StreamHold` per stream."""

    def __init__(self, bounds: WriteBounds | None = None) -> None:
        self.bounds = bounds or WriteBounds()
        self.held = 0
        self.streams = 0
        self._peer_held: dict[str, int] = {}
        self._peer_streams: dict[str, int] = {}

    def peer_held(self, peer: str) -> int:
        return self._peer_held.get(peer, 0)

    def open(self, peer: str) -> StreamHold:
        """Counts a new stream of `peer`; ResourceExhausted when too many are open."""
        bounds = self.bounds
        if self.streams >= bounds.streams:
            raise ResourceExhausted(f"too many write streams open on this node (--max-write-streams {bounds.streams})")
        open_here = self._peer_streams.get(peer, 0)
        if open_here >= bounds.peer_streams:
            raise ResourceExhausted(
                f"too many write streams open on this connection (--max-write-streams-per-peer {bounds.peer_streams})"
            )
        self.streams += 1
        self._peer_streams[peer] = open_here + 1
        return StreamHold(self, peer)

    def _close(self, hold: StreamHold) -> None:
        self._move(hold.peer, -hold.held)
        self.streams -= 1
        left = self._peer_streams[hold.peer] - 1
        if left:
            self._peer_streams[hold.peer] = left
        else:
            del self._peer_streams[hold.peer]

    def _move(self, peer: str, delta: int) -> None:
        self.held += delta
        left = self._peer_held.get(peer, 0) + delta
        if left:
            self._peer_held[peer] = left
        else:
            self._peer_held.pop(peer, None)

    def _check(self, hold: StreamHold, held: int) -> None:
        grow = held - hold.held
        bounds = self.bounds
        if held > bounds.stream_bytes:
            raise ResourceExhausted(
                f"stream holds {format_size(held)} not yet stored, over --max-write-stream-bytes "
                f"{format_size(bounds.stream_bytes)}"
            )
        if self.peer_held(hold.peer) + grow > bounds.peer_bytes:
            raise ResourceExhausted(
                f"connection holds too much not yet stored (--max-write-peer-bytes {format_size(bounds.peer_bytes)})"
            )
        if self.held + grow > bounds.total_bytes:
            raise ResourceExhausted(
                f"node holds too much not yet stored (--max-write-total-bytes {format_size(bounds.total_bytes)})"
            )


class StreamHold:
    """What one stream holds; `hold(n)` sets it (ResourceExhausted when growing past a bound)."""

    __slots__ = ("_budget", "_open", "held", "peer")

    def __init__(self, budget: WriteBudget, peer: str) -> None:
        self._budget = budget
        self.peer = peer
        self.held = 0
        self._open = True

    def hold(self, held: int) -> None:
        """The stream now holds `held` bytes; shrinking always succeeds, growing is checked."""
        if not self._open:
            return
        if held > self.held:
            self._budget._check(self, held)
        self._budget._move(self.peer, held - self.held)
        self.held = held

    def close(self) -> None:
        """Releases everything the stream held (safe twice)."""
        if self._open:
            self._open = False
            self._budget._close(self)
            self.held = 0
