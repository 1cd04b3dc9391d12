"""Routing policies by name (`--policy`): one registry, frozen at import."""

from __future__ import annotations

import random

from services.router.policies.base import Policy, RouteContext
from services.router.policies.cache_aware import CacheAwarePolicy
from services.router.policies.kv_aware import KvAwarePolicy
from services.router.policies.prefix import PrefixPolicy
from services.router.policies.simple import LeastLoadPolicy, RandomPolicy, RoundRobinPolicy
from services.router.settings import POLICY_NAMES, RouterSettings

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadPolicy, PrefixPolicy, CacheAwarePolicy, KvAwarePolicy)
}
assert tuple(POLICIES) == POLICY_NAMES, "settings and registry disagree"


def make_policy(name: str, settings: RouterSettings, rng: random.Random) -> Policy:
    """The policy called `name`; ValueError for an unknown one."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})") from None
    return cls(settings, rng)


__all__ = ["POLICIES", "Policy", "RouteContext", "make_policy"]
