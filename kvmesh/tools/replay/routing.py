"""What the replay needs from a router, whichever way it is reached.

The in-process replay calls the router's core directly (no gRPC, simulated time); the live
replay goes through the router process. Both are adapted to this small surface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ReplayRouter(Protocol):
    """A router as the in-process replay drives it; `now_s` is simulated time."""

    def set_engines(self, member_ids: Sequence[str]) -> None:
        """The engine pods (all joined before the first request)."""

    def route(self, request_id: str, blocks: Sequence[int], now_s: float) -> str:
        """The member id that should serve this prompt."""
        ...

    def release(self, request_id: str, now_s: float) -> None:
        """The request finished."""

    def stored(self, member_id: str, chain: Sequence[int], now_s: float) -> None:
        """The engine now holds this chain of blocks (root first)."""

    def removed(self, member_id: str, blocks: Sequence[int], now_s: float) -> None:
        """The engine evicted these blocks."""
