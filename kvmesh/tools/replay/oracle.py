"""The oracle: a router that sees every engine's real prefix cache and real queue.

Real routers guess what each engine holds (from past routes, or from KV events that arrive a
little late); the oracle asks the simulated engines themselves at the moment of the decision.
What it reaches in the same simulation is what routing could reach with perfect information and
the same load rule, so each policy can be reported as a share of it, next to the infinite-cache
bound (which no routing reaches: it ignores cache capacity).

Its rule is the `prefix` policy's with exact inputs: among the engines whose real load (running +
waiting) is within `imbalance_abs` of the least loaded one, the longest cached prefix wins; ties go
to the lower load, then to the lower engine id (deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvmesh.services.enginesim.engine import BatchingEngine

DEFAULT_IMBALANCE_ABS = 8  # the router's --imbalance-abs default


class OracleRouter:
    """A `ReplayRouter` that `replay_in_process` hands its engines to (`attach_engines`)."""

    def __init__(self, imbalance_abs: int = DEFAULT_IMBALANCE_ABS) -> None:
        self.imbalance_abs = imbalance_abs
        self.engines: Mapping[str, BatchingEngine] = {}
        self.ids: list[str] = []

    def attach_engines(self, engines: Mapping[str, BatchingEngine]) -> None:
        self.engines = engines

    def set_engines(self, member_ids: Sequence[str]) -> None:
        self.ids = sorted(member_ids)

    def route(self, request_id: str, blocks: Sequence[int], now_s: float) -> str:
        if not self.engines:
            raise RuntimeError("the oracle needs the simulated engines: replay_in_process attaches them")
        loads = {m: self.engines[m].running + self.engines[m].queued for m in self.ids}
        low = min(loads.values())
        best: tuple[int, int, str] | None = None
        for m in self.ids:
            if loads[m] - low > self.imbalance_abs:
                continue
            key = (-self.engines[m].lookup(blocks), loads[m], m)
            if best is None or key < best:
                best = key
        assert best is not None
        return best[2]

    def release(self, request_id: str, now_s: float) -> None:
        """Nothing to do: the oracle reads load from the engines."""

    def stored(self, member_id: str, chain: Sequence[int], now_s: float) -> None:
        """Nothing to do: the oracle reads the engines' caches."""

    def removed(self, member_id: str, blocks: Sequence[int], now_s: float) -> None:
        """Nothing to do: the oracle reads the engines' caches."""
