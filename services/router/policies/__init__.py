"""Routing policies by name (`--policy`): one registry, frozen at import."""

from __future__ import annotations

import random

from kvmesh.services.router.policies.base import Policy, RouteContext
from kvmesh.services.router.policies.cache_aware import CacheAwarePolicy
from kvmesh.services.router.policies.kv_aware import KvAwarePolicy
from kvmesh.services.router.policies.prefix import PrefixPolicy
from kvmesh.services.router.policies.simple import LeastLoadPolicy, RandomPolicy, RoundRobinPolicy
from kvmesh.services.router.settings import POLICY_NAMES, RouterSettings

ROUTING_POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadPolicy, PrefixPolicy, CacheAwarePolicy, KvAwarePolicy)
}
assert tuple(ROUTING_POLICIES) == POLICY_NAMES, "settings and registry disagree"


def make_policy(name: str, settings: RouterSettings, rng: random.Random) -> Policy:
    """The policy called `name`; ValueError for an unknown one."""
    try:
        cls = ROUTING_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(ROUTING_POLICIES)})") from None
    return cls(settings, rng)


__all__ = ["ROUTING_POLICIES", "Policy", "RouteContext", "make_policy"]
