"""The router's own core (`RouterCore`) driven in process, on the replay's virtual clock.

The replay measures the router that ships, not a re-implementation: the same tree, the same
policies, the same KV-event handling; only gRPC and the wall clock are taken away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmesh.services.router.core import Removed, RouterCore, Stored
from kvmesh.services.router.settings import RouterSettings
from kvmesh.v1 import common_pb2


class CoreRouter:
    """Adapts `RouterCore` to the replay (see `kvmesh.tools.replay.routing.ReplayRouter`)."""

    def __init__(self, policy: str, seed: int = 0, **knobs: Any) -> None:
        self.now_s = 0.0
        settings = RouterSettings(policy=policy, random_seed=seed, register_self=False, **knobs)
        self.core = RouterCore(policy, settings, clock=lambda: self.now_s)

    def set_engines(self, member_ids: Sequence[str]) -> None:
        for m in member_ids:
            self.core.add_member(common_pb2.Member(id=m, role=common_pb2.ROLE_ENGINE, address=m))

    def route(self, request_id: str, blocks: Sequence[int], now_s: float) -> str:
        self.now_s = now_s
        return self.core.route(blocks, request_id=request_id, checked=True).member_id

    def release(self, request_id: str, now_s: float) -> None:
        self.now_s = now_s
        self.core.release(request_id)

    def stored(self, member_id: str, chain: Sequence[int], now_s: float) -> None:
        self.now_s = now_s
        self.core.apply_events(member_id, [Stored(0, chain)])

    def removed(self, member_id: str, blocks: Sequence[int], now_s: float) -> None:
        self.now_s = now_s
        self.core.apply_events(member_id, [Removed(blocks)])
