"""The data plane's bounds: per-connection and node-wide, each with a flag (docs/dataplane.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataPlaneLimits:
    """What one connection, and all of them together, may hold or take."""

    max_batch_keys: int = 4096  # keys in one request frame
    max_frame_bytes: int = 1024**3  # values in one PUT frame (more: error frame, connection closed)
    max_inflight_bytes: int = 4 * 1024**3  # PUT values being received by all connections at once
    stall_timeout_s: float = 10.0  # a frame or response moving slower than min_rate_bytes over this long is cut
    min_rate_bytes: int = 64 * 1024  # bytes per second a busy connection must move
    idle_timeout_s: float = 300.0  # a connection with nothing to do for this long is closed
    max_pending_ops: int = 4  # requests of one connection waiting on a storage that answers asynchronously


class InflightBudget:
    """Bytes of PUT values being received, over every connection of the node."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserves `size` bytes; False (nothing taken) when that would pass the limit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size
