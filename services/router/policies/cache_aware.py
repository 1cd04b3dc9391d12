"""`cache-aware` (the SGLang router's policy).

1. Imbalanced (max - min load > `--balance-abs` and max > min * `--balance-rel`): least load.
2. Otherwise, if the best match covers more than `--cache-threshold` of the prompt: the
   best-matching pod (ties by load).
3. Otherwise the pod with the smallest tree (fewest blocks held), so new prefixes spread out.
"""

from __future__ import annotations

from kvmesh.services.router.policies.base import Policy, RouteContext


class CacheAwarePolicy(Policy):
    name = "cache-aware"

    def choose(self, ctx: RouteContext) -> int:
        slots = ctx.slots
        loads = ctx.loads()
        high, low = max(loads), min(loads)
        s = self.settings
        if high - low > s.balance_abs and high > low * s.balance_rel:
            return self.least_loaded(slots, loads)
        score, top = ctx.best()  # matched blocks, weighted by medium (`--kv-medium-weights`)
        if ctx.total and score / ctx.total > s.cache_threshold:
            best = [(slot, load) for slot, load in zip(slots, loads, strict=True) if slot in top]
            if best:
                return self.least_loaded([p[0] for p in best], [p[1] for p in best])
        sizes = [ctx.tree.pod_blocks(slot) for slot in slots]
        smallest = min(sizes)
        pairs = [(slot, load) for slot, load, size in zip(slots, loads, sizes, strict=True) if size == smallest]
        return self.least_loaded([p[0] for p in pairs], [p[1] for p in pairs])
