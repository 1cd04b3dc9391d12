"""The router without gRPC: pod set, prefix tree, policy and load bookkeeping in one object.

`RouterCore` is what the gRPC servicer wraps and what in-process users (the trace-replay
benchmark, tests) call directly. Every method is synchronous and never awaits, so on one
asyncio thread each call is atomic: a membership change is applied whole between two
routing decisions, and a pod that left is gone from every node before the next decision.
"""

from __future__ import annotations

import random
import secrets
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvmesh.blocks import BlockHasher
from kvmesh.membership import MembershipChange
from kvmesh.runtime.errors import InvalidArgument, Unavailable
from kvmesh.services.router.media import MediumTable
from kvmesh.services.router.pods import Pod, PodTable
from kvmesh.services.router.policies import Policy, RouteContext, make_policy
from kvmesh.services.router.settings import RouterSettings
from kvmesh.services.router.tree import PrefixTree
from kvmesh.v1 import common_pb2

U64_MAX = (1 << 64) - 1
_MAX_HASHERS = 256  # distinct model names whose hasher is cached
MAX_DEPARTED = 1024  # departed pods kept for a rejoin at most (the oldest go first)


def _block_ids(keys: list[bytes]) -> tuple[int, ...]:
    """Router block ids of 16-byte cache keys (`kvmesh.blocks.block_id`, vectorised)."""
    if not keys:
        return ()
    return tuple(np.frombuffer(b"".join(keys), dtype="<u8")[::2].tolist())


def new_request_id() -> str:
    """An id for a request that came without one: random (96 bits), so another client cannot guess
    it and release someone else's request (sequential ids r1, r2, ... could be)."""
    return "r" + secrets.token_hex(12)


class Decision(NamedTuple):
    """Where one request goes (a NamedTuple: built on every route, and cheap to build)."""

    request_id: str
    member_id: str
    address: str
    matched_blocks: int
    total_blocks: int
    policy: str
    slot: int


@dataclass(frozen=True, slots=True)
class Stored:
    """The member stored `ids`, a chain continuing from `parent_id` (0: from the root), in
    medium tier `tier` (0: GPU memory; `media.py`)."""

    parent_id: int
    ids: Sequence[int]
    tier: int = 0


@dataclass(frozen=True, slots=True)
class Retiered:
    """The member's copies of `ids` (blocks it holds) are now in medium tier `tier` only (a
    GPU copy evicted while a CPU copy stays, or a CPU copy loaded back into GPU memory)."""

    ids: Sequence[int]
    tier: int


@dataclass(frozen=True, slots=True)
class Removed:
    """The member evicted `ids`."""

    ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class Cleared:
    """The member dropped its whole cache."""


KvEvent = Stored | Removed | Cleared | Retiered


def event_slices(events: Sequence[KvEvent], budget: int) -> Iterator[list[KvEvent]]:
    """Cuts `events` into slices of about `budget` blocks each, in order.

    A `stored` chain longer than the budget is cut into pieces that chain on from each other
    (each piece's parent is the previous piece's last id), so applying the slices one per
    event-loop turn does the same as applying the events at once, and no slice holds the loop
    for longer than its `budget` blocks take.
    """
    piece: list[KvEvent] = []
    used = 0
    for event in events:
        if isinstance(event, Stored) and len(event.ids) > budget:
            parent, ids = event.parent_id, event.ids
            for start in range(0, len(ids), budget):
                part = ids[start : start + budget]
                if piece and used + len(part) > budget:
                    yield piece
                    piece, used = [], 0
                piece.append(Stored(parent, part, event.tier))
                used += len(part)
                parent = part[-1]
            continue
        cost = len(event.ids) if isinstance(event, Stored | Removed | Retiered) else 1
        if piece and used + cost > budget:
            yield piece
            piece, used = [], 0
        piece.append(event)
        used += max(cost, 1)
    if piece:
        yield piece


@dataclass(frozen=True, slots=True)
class EventResult:
    """What `apply_events` did: events applied, events ignored, and why some were ignored."""

    applied: int
    ignored: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RouterStats:
    members: int
    tree_nodes: int
    routed: int
    policy: str
    inflight: int
    evicted_blocks: int
    events_applied: int
    events_ignored: int
    members_in_grace: int = 0
    membership_stale: bool = False


def _too_long(text: str, limit: int) -> bool:
    """More than `limit` UTF-8 bytes (encoding only when the length in characters cannot tell)."""
    return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)


class RouterCore:
    """Routes prompts (as block ids, tokens or text) to engine pods."""

    def __init__(
        self,
        policy: str | Policy | None = None,
        settings: RouterSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.rng = random.Random(self.settings.random_seed)
        if isinstance(policy, Policy):
            self.policy = policy
        else:
            self.policy = make_policy(policy or self.settings.policy, self.settings, self.rng)
        self.clock = clock
        self.pods = PodTable()
        self.pods.recent_window = self.settings.share_window
        self.media = MediumTable.from_spec(self.settings.kv_medium_weights)
        self.tree = PrefixTree(self.settings.max_tree_blocks)
        # (owner, request_id) → (slot, pod generation, routed at); insertion order is routing order.
        # The owner is the principal that routed the request ("" without a security policy): one
        # principal's ids never meet another's, so nobody can release (or re-route) a request
        # it did not route, even by reusing its id.
        self._inflight: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._hashers: dict[str, BlockHasher] = {}
        self.routed = 0
        self.events_applied = 0
        self.events_ignored = 0
        # Set by the service: whether the membership it follows is stale (the watch is broken).
        self.membership_stale: Callable[[], bool] = lambda: False

    # ---- membership -----------------------------------------------------------------------
    def update_pods(self, change: MembershipChange) -> None:
        """Applies one membership diff: leaves first (their slots may be reused), then joins."""
        for member in change.left:
            self.leave(member.id)
        for member in change.joined:
            self.add_member(member)
        for member in change.updated:
            self.add_member(member)

    def add_member(self, member: common_pb2.Member) -> Pod:
        """A member joined (or changed): routable at once. One that left within the grace window
        and comes back with the same id and address keeps its tree."""
        pod = self.pods.get(member.id)
        if pod is not None and pod.departed_at is not None:
            if pod.address == member.address:
                return self.pods.rejoin(member)
            self.remove_member(member.id)  # another process under the same id: its cache is not ours
            pod = None
        pod = self.pods.add(member) if pod is None else self.pods.update(member)
        return pod

    def leave(self, member_id: str) -> None:
        """A member left: kept (tree and all, not routed to while others live) for
        --rejoin-grace-seconds, or removed now when that is 0."""
        if self.settings.rejoin_grace_seconds <= 0:
            self.remove_member(member_id)
            return
        self.pods.depart(member_id, self.clock())
        while len(self.pods.departed) > MAX_DEPARTED:
            self.remove_member(next(iter(self.pods.departed)))

    def expire_departed(self, now: float | None = None) -> int:
        """Removes the members that left longer than --rejoin-grace-seconds ago."""
        now = self.clock() if now is None else now
        cutoff = now - self.settings.rejoin_grace_seconds
        expired = [m for m, pod in self.pods.departed.items() if (pod.departed_at or 0.0) <= cutoff]
        for member_id in expired:
            self.remove_member(member_id)
        return len(expired)

    def _check_strings(self, model: str, request_id: str) -> None:
        """Every string a client sends is bounded, so none can make the router hold much memory."""
        s = self.settings
        if _too_long(request_id, s.max_request_id_bytes):
            raise InvalidArgument(f"request_id longer than --max-request-id-bytes {s.max_request_id_bytes}")
        if _too_long(model, s.max_model_bytes):
            raise InvalidArgument(f"model name longer than --max-model-bytes {s.max_model_bytes}")

    def remove_member(self, member_id: str) -> bool:
        """A member left: its blocks leave every node now, O(its blocks), and it is never chosen."""
        pod = self.pods.get(member_id)
        if pod is None:
            return False
        self.tree.clear(pod.slot)
        self.pods.remove(member_id)
        return True

    # ---- routing --------------------------------------------------------------------------
    def hasher(self, model: str) -> BlockHasher:
        h = self._hashers.get(model)
        if h is None:
            if len(self._hashers) >= _MAX_HASHERS:
                self._hashers.clear()
            s = self.settings
            h = BlockHasher(
                namespace=s.hash_namespace, model=model, block_size=s.block_size, text_block_bytes=s.text_block_bytes
            )
            self._hashers[model] = h
        return h

    def route_tokens(self, tokens: Sequence[int] | np.ndarray, model: str = "", request_id: str = "",
                     owner: str = "") -> Decision:
        """Routes a prompt given as token ids (hashed with --block-size; only full blocks count)."""
        self._check_strings(model, request_id)
        limit = self.settings.max_prompt_blocks * self.settings.block_size
        if len(tokens) >= limit + self.settings.block_size:
            raise InvalidArgument(f"prompt of {len(tokens)} tokens is over --max-prompt-blocks")
        try:
            if not isinstance(tokens, np.ndarray):
                # array('q') converts a list (or a protobuf repeated field) in C, far faster than
                # np.asarray over Python ints; the hasher then checks the uint32 range.
                tokens = np.frombuffer(array("q", tokens), dtype=np.int64)
            ids = _block_ids(self.hasher(model).token_keys(tokens))
        except (ValueError, OverflowError, TypeError) as exc:
            raise InvalidArgument(f"bad token ids: {exc}") from None
        return self.route(ids, model, request_id, checked=True, owner=owner)

    def route_text(self, text: str, model: str = "", request_id: str = "", owner: str = "") -> Decision:
        """Routes a text prompt (blocks of --text-block-bytes UTF-8 bytes)."""
        self._check_strings(model, request_id)
        if len(text) >= (self.settings.max_prompt_blocks + 1) * self.settings.text_block_bytes:
            raise InvalidArgument("text prompt is over --max-prompt-blocks")
        return self.route(_block_ids(self.hasher(model).text_keys(text)), model, request_id, checked=True,
                          owner=owner)

    def route(self, block_ids: Sequence[int], model: str = "", request_id: str = "", checked: bool = False,
              owner: str = "") -> Decision:
        """Chooses a pod for a prompt given as chained block ids and counts the request in flight.

        `checked` skips the range check when the ids come from a source that guarantees u64
        (protobuf, the hasher). `owner` is who routed it (only the same owner releases it).
        Raises Unavailable with no engine pod, InvalidArgument on bad ids.
        """
        self._check_strings(model, request_id)
        if len(block_ids) > self.settings.max_prompt_blocks:
            raise InvalidArgument(
                f"prompt of {len(block_ids)} blocks is over --max-prompt-blocks={self.settings.max_prompt_blocks}"
            )
        if not checked and block_ids:
            try:
                low, high = min(block_ids), max(block_ids)
            except TypeError:
                raise InvalidArgument("block ids must be integers") from None
            if low < 0 or high > U64_MAX:
                raise InvalidArgument("block ids must fit in uint64")
        if type(block_ids) is not tuple:
            block_ids = tuple(block_ids)  # the tree compares runs as tuples
        pods = self.pods
        candidates = pods.candidates(model)
        if not candidates:
            raise Unavailable("no engine member to route to")
        tree = self.tree
        match = tree.match(block_ids, candidates)
        ctx = RouteContext(pods, tree, candidates, match, self.media.weights)
        slot = self.policy.choose(ctx)
        pod = pods.slots[slot]
        assert pod is not None
        now = self.clock()
        matched = match.matched(pod.bit)
        if block_ids:
            if pod.precise:
                tree.touch(slot, block_ids, matched, now)
            else:
                tree.hold(slot, block_ids, now, match)
        if not request_id:
            request_id = new_request_id()
        inflight = self._inflight
        key = (owner, request_id)
        previous = inflight.pop(key, None)
        if previous is not None:  # the same request routed again (a retry): count it once
            self._drop(previous)
        inflight[key] = (slot, pod.generation, now)
        pods.started(slot)
        if len(inflight) > self.settings.max_inflight_requests:  # forget the oldest, as the sweep would
            self._drop(inflight.pop(next(iter(inflight))))
        self.routed += 1
        return Decision(request_id, pod.member_id, pod.address, matched, len(block_ids), self.policy.name, slot)

    def _drop(self, entry: tuple[int, int, float]) -> None:
        slot, generation, _ = entry
        pod = self.pods.slots[slot] if slot < len(self.pods.slots) else None
        if pod is not None and pod.generation == generation:
            self.pods.finished(slot)

    def release(self, request_id: str, owner: str = "") -> bool:
        """The request finished: its pod's in-flight load drops. False when `owner` has no such
        request in flight (unknown, already released, or routed by someone else: all alike)."""
        entry = self._inflight.pop((owner, request_id), None)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def release_any(self, request_id: str) -> bool:
        """An admin's release: the request with this id whoever routed it (one scan; admins only)."""
        key = next((k for k in self._inflight if k[1] == request_id), None)
        if key is None:
            return False
        self._drop(self._inflight.pop(key))
        return True

    def inflight(self, member_id: str) -> int:
        pod = self.pods.get(member_id)
        return self.pods.inflight[pod.slot] if pod is not None else 0

    # ---- precise KV events ------------------------------------------------------------------
    def apply_events(self, member_id: str, events: Iterable[KvEvent]) -> EventResult:
        """Applies a member's KV events in order (precise mode).

        The member's first batch switches it to precise mode: the blocks guessed for it from
        routes are dropped, and from then on only its events say what it holds. Events of a
        member the router does not know (not an engine, or its JOIN not seen yet) are ignored.
        A `stored` chain whose parent the router does not know is ignored too.
        """
        events = list(events)
        pod = self.pods.get(member_id)
        if pod is None:
            self.events_ignored += len(events)
            return EventResult(0, len(events), f"unknown member {member_id!r}")
        tree = self.tree
        slot = pod.slot
        if not pod.precise:
            pod.precise = True
            tree.clear(slot)
        now = self.clock()
        applied = ignored = 0
        for event in events:
            if isinstance(event, Stored):
                if tree.store(slot, event.parent_id, event.ids, now, event.tier) < 0:
                    ignored += 1
                    continue
            elif isinstance(event, Removed):
                tree.remove(slot, event.ids)
            elif isinstance(event, Retiered):
                tree.retier(slot, event.ids, event.tier)
            elif isinstance(event, Cleared):
                tree.clear(slot)
            else:
                raise InvalidArgument(f"not a KV event: {event!r}")
            applied += 1
        self.events_applied += applied
        self.events_ignored += ignored
        return EventResult(applied, ignored, "stored chain with an unknown parent" if ignored else "")

    # ---- housekeeping -------------------------------------------------------------------------
    def sweep_requests(self, now: float | None = None) -> int:
        """Forgets requests routed longer than --inflight-timeout-seconds ago and never released."""
        now = self.clock() if now is None else now
        cutoff = now - self.settings.inflight_timeout_seconds
        stale: list[tuple[str, str]] = []
        for key, entry in self._inflight.items():
            if entry[2] >= cutoff:
                break
            stale.append(key)
        for key in stale:
            self._drop(self._inflight.pop(key))
        return len(stale)

    def expire_pod(self, member_id: str, now: float | None = None) -> int:
        """Drops one approximate pod's blocks older than --approx-ttl-seconds (O(its blocks))."""
        pod = self.pods.get(member_id)
        if pod is None or pod.precise:
            return 0
        now = self.clock() if now is None else now
        return self.tree.expire(pod.slot, now - self.settings.approx_ttl_seconds)

    def stats(self) -> RouterStats:
        return RouterStats(
            members=len(self.pods),
            tree_nodes=len(self.tree),
            routed=self.routed,
            policy=self.policy.name,
            inflight=len(self._inflight),
            evicted_blocks=self.tree.evicted,
            events_applied=self.events_applied,
            events_ignored=self.events_ignored,
            members_in_grace=len(self.pods.departed),
            membership_stale=self.membership_stale(),
        )
