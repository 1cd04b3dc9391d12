"""`prefix`: longest prefix match, unless the load is too uneven.

When max - min load over the candidates exceeds `--imbalance-abs`, only the least-loaded
pods compete (a hot prefix must not pile every request onto one pod). Among the competitors
the longest match wins; ties go to the lower load, then at random.
"""

from __future__ import annotations

from services.router.policies.base import Policy, RouteContext


class PrefixPolicy(Policy):
    name = "prefix"

    def choose(self, ctx: RouteContext) -> int:
        slots = ctx.slots
        loads = ctx.loads()
        low = min(loads)
        if max(loads) - low > self.settings.imbalance_abs:
            pairs = [(s, load) for s, load in zip(slots, loads, strict=True) if load == low]
        else:
            pairs = list(zip(slots, loads, strict=True))
        depths = ctx.depths()
        best_key: tuple[int, int] | None = None
        ties: list[int] = []
        for slot, load in pairs:
            key = (-depths.get(slot, 0), load)
            if best_key is None or key < best_key:
                best_key = key
                ties = [slot]
            elif key == best_key:
                ties.append(slot)
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)
