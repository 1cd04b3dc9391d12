"""`prefix`: longest prefix match, traded against load and against each pod's share of traffic.

When max - min load over the candidates exceeds `--imbalance-abs`, only the least-loaded
pods compete (a hot prefix must not pile every request onto one pod). Among the competitors
each pod scores the share of the prompt it holds, each block weighted by the medium it is held
in (`--kv-medium-weights`: a block only in a pod's CPU tier counts less than one in its GPU),
less `--share-weight` times how far its share of recent routes (`PodTable.recent`, fading over
`--share-window` routes) is above the mean, beyond chance. So a pod that has been taking more
than its share keeps the requests it holds much of (a conversation's next turn), but a request
it holds little more of than others (a new conversation on a hot system prompt) goes
elsewhere: in-flight counts alone miss that pile-up when engines answer quickly and only 1-3
requests are in flight at a time. The best score wins; ties go to the lower load, then the
smaller recent share, then at random.
"""

from __future__ import annotations

import math

from kvmesh.services.router.policies.base import Policy, RouteContext


class PrefixPolicy(Policy):
    name = "prefix"

    def choose(self, ctx: RouteContext) -> int:
        slots = ctx.slots
        loads = ctx.loads()
        if len(slots) == 1:
            return slots[0]
        low = min(loads)
        gated = max(loads) - low > self.settings.imbalance_abs
        scores = ctx.scores()
        total = ctx.total or 1
        weight = self.settings.share_weight
        pods = ctx.pods
        recent = [pods.recent(slot) for slot in slots]
        mean = sum(recent) / len(recent)
        # Excess only beyond chance: one standard deviation of a fair (Poisson) share plus one
        # route, so a lone conversation's few turns at low traffic still stay together.
        fair = mean + math.sqrt(mean) + 1.0
        best: tuple[float, int, float] | None = None
        ties: list[int] = []
        for slot, load, share in zip(slots, loads, recent, strict=True):
            if gated and load != low:
                continue
            score = scores.get(slot, 0) / total
            if share > fair:
                score -= weight * (share - fair) / mean
            key = (score, -load, -share)
            if best is None or key > best:
                best, ties = key, [slot]
            elif key == best:
                ties.append(slot)
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)
