"""How often members heartbeat and how often their load reaches watchers.

Both adapt to the number of KeepAlive streams this replica serves, so 1,000 members
neither overload the replica nor flood watchers with UPDATE events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvmesh.v1 import common_pb2


@dataclass(frozen=True)
class HeartbeatPolicy:
    """Interval = ttl/3, stretched so this replica sees at most `max_per_second` heartbeats.

    Never longer than ttl/2, so a member always has a second chance before its lease ends.
    """

    max_per_second: float = 2000.0
    floor_ms: int = 100

    def interval_ms(self, ttl_seconds: int, members: int) -> int:
        base = ttl_seconds * 1000 / 3
        stretched = members * 1000 / self.max_per_second
        return int(max(self.floor_ms, min(ttl_seconds * 1000 / 2, max(base, stretched))))


@dataclass(frozen=True)
class LoadUpdatePolicy:
    """A member's load is written (one UPDATE) only when it changed, at most once per interval.

    The interval is `min_interval_s`, stretched so the replica writes at most
    `max_per_second` load updates in total; loads in between are coalesced (the latest wins).
    """

    min_interval_s: float = 1.0
    max_per_second: float = 200.0

    def interval_s(self, members: int) -> float:
        return max(self.min_interval_s, members / self.max_per_second)


class LoadThrottle:
    """Per KeepAlive stream: decides whether the load just received should be written now."""

    def __init__(self, policy: LoadUpdatePolicy, written: common_pb2.Load | None = None) -> None:
        self._policy = policy
        self._written = written
        self._written_at = time.monotonic()

    def due(self, load: common_pb2.Load, members: int) -> bool:
        if self._written is not None and load == self._written:
            return False
        return time.monotonic() - self._written_at >= self._policy.interval_s(members)

    def wrote(self, load: common_pb2.Load) -> None:
        self._written = common_pb2.Load()
        self._written.CopyFrom(load)
        self._written_at = time.monotonic()
