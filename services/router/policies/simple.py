"""Policies that ignore the cache: random, round-robin and least-load (baselines)."""

from __future__ import annotations

from kvmesh.services.router.policies.base import Policy, RouteContext


class RandomPolicy(Policy):
    """Uniformly random pod."""

    name = "random"

    def choose(self, ctx: RouteContext) -> int:
        return self.rng.choice(ctx.slots)


class RoundRobinPolicy(Policy):
    """The next pod in slot order (stable across joins and leaves of other pods)."""

    name = "round-robin"
    _counter = 0

    def choose(self, ctx: RouteContext) -> int:
        self._counter += 1
        return ctx.slots[self._counter % len(ctx.slots)]


class LeastLoadPolicy(Policy):
    """The pod with the fewest in-flight plus reported requests."""

    name = "least-load"

    def choose(self, ctx: RouteContext) -> int:
        return self.least_loaded(ctx.slots, ctx.loads())
