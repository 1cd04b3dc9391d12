"""`prefix`: longest prefix match, unless the load is too uneven.

When max - min load over the candidates exceeds `--imbalance-abs`, only the least-loaded
pods compete (a hot prefix must not pile every request onto one pod). Among the competitors
the longest match wins, each matched block weighted by the medium it is held in
(`--kv-medium-weights`: a block only in a pod's CPU tier counts less than one in its GPU);
ties go to the lower load, then at random.
"""

from __future__ import annotations

from kvmesh.services.router.policies.base import Policy, RouteContext


class PrefixPolicy(Policy):
    name = "prefix"

    def choose(self, ctx: RouteContext) -> int:
        slots = ctx.slots
        loads = ctx.loads()
        low = min(loads)
        gated = max(loads) - low > self.settings.imbalance_abs
        load_of = ctx.pods.loads  # by slot
        # Only pods holding part of the prompt are in `depths` (usually few).
        best = 0.0
        ties: list[int] = []
        for slot, depth in ctx.scores().items():
            if gated and load_of[slot] != low:
                continue
            if depth > best:
                best, ties = depth, [slot]
            elif depth == best:
                ties.append(slot)
        if not best:
            if gated:
                ties = [s for s, load in zip(slots, loads, strict=True) if load == low]
                return ties[0] if len(ties) == 1 else self.rng.choice(ties)
            return self.least_loaded(slots, loads)
        if len(ties) == 1:
            return ties[0]
        return self.least_loaded(ties, [load_of[s] for s in ties])
