"""OpenTelemetry instruments of the router, read from `RouterCore` when exported.

Observable instruments only: the exporter's collection callback reads the core's counters,
so the routing hot path pays nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from kvmesh.services.router.core import RouterCore, RouterStats
from kvmesh.telemetry import meter


def _observe(core: RouterCore, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        stats: RouterStats = core.stats()
        return [Observation(getattr(stats, field), {"policy": stats.policy})]

    return callback


def register_router_metrics(core: RouterCore) -> None:
    m = meter("router")
    m.create_observable_counter(
        "kvmesh.router.routed", callbacks=[_observe(core, "routed")], description="routing decisions made"
    )
    m.create_observable_counter(
        "kvmesh.router.evicted_blocks",
        callbacks=[_observe(core, "evicted_blocks")],
        description="blocks evicted from the prefix tree (--max-tree-blocks)",
    )
    m.create_observable_counter(
        "kvmesh.router.events_applied", callbacks=[_observe(core, "events_applied")], description="KV events applied"
    )
    m.create_observable_counter(
        "kvmesh.router.events_ignored",
        callbacks=[_observe(core, "events_ignored")],
        description="KV events ignored (unknown member, unknown parent)",
    )
    m.create_observable_gauge(
        "kvmesh.router.members", callbacks=[_observe(core, "members")], description="engine pods routable"
    )
    m.create_observable_gauge(
        "kvmesh.router.tree_blocks", callbacks=[_observe(core, "tree_nodes")], description="blocks in the prefix tree"
    )
    m.create_observable_gauge(
        "kvmesh.router.inflight", callbacks=[_observe(core, "inflight")], description="requests routed, not released"
    )
