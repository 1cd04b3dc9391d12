"""`kv-aware` (the llm-d / Dynamo KV router's cost model).

cost(pod) = `--overlap-weight` * blocks the pod would still have to prefill + its load, where a
matched block counts by the medium it is held in (`--kv-medium-weights`: a block only in CPU
memory at weight 0.5 still costs half a block to bring back).
The lowest cost wins (ties at random); with `--temperature` > 0 the pod is sampled from
softmax(-cost / temperature), which spreads load across near-equal pods.
"""

from __future__ import annotations

import math

from kvmesh.services.router.policies.base import Policy, RouteContext


class KvAwarePolicy(Policy):
    name = "kv-aware"

    def choose(self, ctx: RouteContext) -> int:
        slots = ctx.slots
        loads = ctx.loads()
        depths = ctx.scores()
        total = ctx.total
        weight = self.settings.overlap_weight
        costs = [weight * (total - depths.get(slot, 0)) + load for slot, load in zip(slots, loads, strict=True)]
        temperature = self.settings.temperature
        if temperature <= 0 or len(slots) == 1:
            low = min(costs)
            ties = [slot for slot, cost in zip(slots, costs, strict=True) if cost == low]
            return ties[0] if len(ties) == 1 else self.rng.choice(ties)
        low = min(costs)
        weights = [math.exp(-(cost - low) / temperature) for cost in costs]
        return self.rng.choices(slots, weights=weights, k=1)[0]
