"""The engine pods the router may choose, each in a small-integer slot.

Slots let the tree keep holders as one int bitmask per node and let policies index plain
lists. A slot is reused only after its pod's blocks were removed from the tree (the caller
does that before `remove`), so a new pod never inherits an old pod's bits. Each occupant
gets a fresh generation number, so a `Release` for a request routed to a pod that has since
left never lowers the load of the pod that took its slot.

A pod that left may be kept `departed` for a grace window (its slot and tree bits stay): it
is no candidate while any live pod is, comes back with its tree if it rejoins, and is the
last resort while no live pod remains (a metadata flicker makes every engine leave at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter

from kvmesh.v1 import common_pb2


@dataclass(slots=True)
class Pod:
    """One engine member as the router sees it."""

    member_id: str
    address: str
    model: str
    slot: int
    generation: int
    reported: int = 0  # running + waiting requests from the member's own load report
    precise: bool = False  # sends KV events: no approximate learning for it
    departed_at: float | None = None  # left at this time, kept while it may rejoin
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def bit(self) -> int:
        return 1 << self.slot


def reported_load(member: common_pb2.Member) -> int:
    return int(member.load.running_requests) + int(member.load.waiting_requests)


class PodTable:
    """Pods by slot and by member id, with in-flight counts and per-model slot masks."""

    def __init__(self) -> None:
        self.slots: list[Pod | None] = []
        self.by_id: dict[str, Pod] = {}
        self.inflight: list[int] = []
        self.loads: list[int] = []  # inflight + reported, per slot, kept current for the policies
        self.recent_window = 256  # routes over which `recent` forgets (set from --balance-window)
        self._recent: list[float] = []  # routes to each slot, decayed per route, as of `_recent_at`
        self._recent_at: list[int] = []
        self._routes = 0  # routes so far: the clock `recent` decays on
        self.all_mask = 0
        self.model_masks: dict[str, int] = {}
        self.departed: dict[str, Pod] = {}  # member id → pod kept after it left, oldest first
        self.departed_mask = 0
        self.departed_model_masks: dict[str, int] = {}
        self._free: list[int] = []
        self._generation = 0
        self._slot_lists: dict[int, list[int]] = {}
        self._load_getters: dict[int, Callable[[list[int]], tuple[int, ...]]] = {}

    def __len__(self) -> int:
        """Live pods (departed ones kept for a rejoin are not counted)."""
        return len(self.by_id) - len(self.departed)

    def __contains__(self, member_id: str) -> bool:
        return member_id in self.by_id

    def get(self, member_id: str) -> Pod | None:
        return self.by_id.get(member_id)

    def load(self, slot: int) -> int:
        """In-flight requests routed here and not yet released, plus the member's reported load."""
        return self.loads[slot]

    def started(self, slot: int) -> None:
        self.inflight[slot] += 1
        self.loads[slot] += 1
        self._recent[slot] = self.recent(slot) + 1.0
        self._routes += 1
        self._recent_at[slot] = self._routes

    def recent(self, slot: int) -> float:
        """Routes to `slot` lately: each past route counts (1 - 1/window) less per later route.

        In-flight counts say how busy a pod is now; this says how much of the traffic it has
        been taking, which a fast pod with few in flight can still hog (a hot prefix).
        """
        behind = self._routes - self._recent_at[slot]
        value = self._recent[slot]
        return value * (1.0 - 1.0 / self.recent_window) ** behind if behind and value else value

    def finished(self, slot: int) -> None:
        if self.inflight[slot] > 0:
            self.inflight[slot] -= 1
            self.loads[slot] -= 1

    def loads_of(self, mask: int) -> tuple[int, ...]:
        """Loads of the slots in `mask`, in `slots_of(mask)` order (one C call per route)."""
        getter = self._load_getters.get(mask)
        if getter is None:
            slots = self.slots_of(mask)
            if len(slots) == 1:
                only = slots[0]
                getter = lambda loads: (loads[only],)  # noqa: E731
            else:
                getter = itemgetter(*slots)
            self._load_getters[mask] = getter
        return getter(self.loads)

    def add(self, member: common_pb2.Member) -> Pod:
        """A member joined: it gets the lowest free slot (its bits are clear in the tree)."""
        if self._free:
            self._free.sort()
            slot = self._free.pop(0)
        else:
            slot = len(self.slots)
            self.slots.append(None)
            self.inflight.append(0)
            self.loads.append(0)
            self._recent.append(0.0)
            self._recent_at.append(0)
        self._generation += 1
        pod = Pod(
            member_id=member.id,
            address=member.address,
            model=member.model,
            slot=slot,
            generation=self._generation,
            reported=reported_load(member),
            labels=dict(member.labels),
        )
        self.slots[slot] = pod
        self.inflight[slot] = 0
        self.loads[slot] = pod.reported
        self._recent[slot] = 0.0  # a new pod starts with no share, so it draws new work first
        self.by_id[member.id] = pod
        self._recompute_masks()
        return pod

    def update(self, member: common_pb2.Member) -> Pod:
        """A member's address, model or load changed."""
        pod = self.by_id[member.id]
        pod.reported = reported_load(member)
        self.loads[pod.slot] = self.inflight[pod.slot] + pod.reported
        pod.labels = dict(member.labels)
        if pod.address != member.address or pod.model != member.model:
            pod.address = member.address
            pod.model = member.model
            self._recompute_masks()
        return pod

    def depart(self, member_id: str, now: float) -> Pod | None:
        """A member left but may rejoin: no longer a candidate while live pods exist; slot and tree kept."""
        pod = self.by_id.get(member_id)
        if pod is None or pod.departed_at is not None:
            return pod
        pod.departed_at = now
        self.departed[member_id] = pod
        self._recompute_masks()
        return pod

    def rejoin(self, member: common_pb2.Member) -> Pod:
        """A departed member is back: live again with its slot (and so its tree)."""
        pod = self.by_id[member.id]
        pod.departed_at = None
        self.departed.pop(member.id, None)
        self.update(member)
        self._recompute_masks()
        return pod

    def remove(self, member_id: str) -> Pod | None:
        """A member left; its slot becomes free (the caller already cleared it from the tree)."""
        pod = self.by_id.pop(member_id, None)
        if pod is None:
            return None
        self.departed.pop(member_id, None)
        self.slots[pod.slot] = None
        self.inflight[pod.slot] = 0
        self.loads[pod.slot] = 0
        self._free.append(pod.slot)
        self._recompute_masks()
        return pod

    def _recompute_masks(self) -> None:
        # O(pods) per membership change; keeps candidate selection O(1) per route.
        masks: dict[str, int] = {}
        departed: dict[str, int] = {}
        all_mask = departed_mask = 0
        for pod in self.by_id.values():
            if pod.departed_at is not None:
                departed_mask |= pod.bit
                departed[pod.model] = departed.get(pod.model, 0) | pod.bit
                continue
            all_mask |= pod.bit
            masks[pod.model] = masks.get(pod.model, 0) | pod.bit
        self.all_mask = all_mask
        self.model_masks = masks
        self.departed_mask = departed_mask
        self.departed_model_masks = departed
        self._slot_lists = {}
        self._load_getters = {}

    def candidates(self, model: str) -> int:
        """Slot mask of the pods a request for `model` may go to.

        Pods serving exactly that model when there are any; otherwise every pod (a gateway
        that names no model, or a mesh whose members do not declare one).
        """
        if model:
            mask = self.model_masks.get(model)
            if mask:
                return mask
        if self.all_mask or not self.departed_mask:
            return self.all_mask
        # No live pod: the ones that left within the grace window (they are likely coming back).
        return (self.departed_model_masks.get(model, 0) if model else 0) or self.departed_mask

    def slots_of(self, mask: int) -> list[int]:
        """The slots in `mask`, cached until the pod set changes (policies iterate this)."""
        out = self._slot_lists.get(mask)
        if out is None:
            out = []
            m = mask
            while m:
                low = m & -m
                out.append(low.bit_length() - 1)
                m ^= low
            self._slot_lists[mask] = out
        return out
