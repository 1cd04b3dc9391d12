"""Property-based: RouterCore's tree against a plain reference model.

The reference keeps, for every held prefix (a tuple of tokens), which pods hold it and when
each last used it; the tree's structure must be exactly the prefix closure of the held
prefixes. Random sequences of routes (approximate learning), precise events (stored,
removed, cleared), TTL expiry, CLOCK evictions and pod joins/leaves must give the same
per-pod match lengths, holders, stamps and structure.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmesh.services.router.core import Cleared, Removed, Stored
from tests.router.helpers import FakeClock, core, member

NAMES = ["p0", "p1", "p2", "p3", "p4"]
TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=7)


class Reference:
    def __init__(self) -> None:
        self.held: dict[tuple[int, ...], dict[str, float]] = {}
        self.precise: set[str] = set()
        # Prefixes stored by precise events (the only ones an event may name as parent),
        # while they stay in the tree.
        self.indexed: set[tuple[int, ...]] = set()

    def closure(self) -> set[tuple[int, ...]]:
        out: set[tuple[int, ...]] = set()
        for path in self.held:
            for i in range(1, len(path) + 1):
                out.add(path[:i])
        return out

    def depth(self, name: str, prompt: tuple[int, ...]) -> int:
        k = 0
        for i in range(1, len(prompt) + 1):
            if name in self.held.get(prompt[:i], {}):
                k = i
            else:
                break
        return k

    def hold(self, name: str, paths: list[tuple[int, ...]], now: float) -> None:
        for p in paths:
            self.held.setdefault(p, {})[name] = now

    def drop(self, name: str, paths: list[tuple[int, ...]]) -> None:
        for p in paths:
            holders = self.held.get(p)
            if holders and name in holders:
                del holders[name]
                if not holders:
                    del self.held[p]

    def paths_of(self, name: str) -> list[tuple[int, ...]]:
        return [p for p, h in self.held.items() if name in h]


class TreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.router = core("random", clock=self.clock, approx_ttl_seconds=10, max_tree_blocks=1_000_000)
        self.ref = Reference()
        self.ids: dict[tuple[int, ...], int] = {}
        self.paths: dict[int, tuple[int, ...]] = {}

    def id_of(self, path: tuple[int, ...]) -> int:
        """Chained, unique ids: one id per prefix, as chained block hashes give."""
        if path not in self.ids:
            bid = (len(self.ids) * 0x9E3779B97F4A7C15 + 12345) & ((1 << 64) - 1)
            self.ids[path] = bid
            self.paths[bid] = path
        return self.ids[path]

    def chain(self, tokens: list[int]) -> tuple[list[int], list[tuple[int, ...]]]:
        paths = [tuple(tokens[: i + 1]) for i in range(len(tokens))]
        return [self.id_of(p) for p in paths], paths

    def members(self) -> list[str]:
        return sorted(self.router.pods.by_id)

    @rule(name=st.sampled_from(NAMES))
    def join(self, name: str) -> None:
        if name not in self.router.pods:
            self.router.add_member(member(name))

    @rule(name=st.sampled_from(NAMES))
    def leave(self, name: str) -> None:
        self.router.remove_member(name)
        self.ref.drop(name, self.ref.paths_of(name))
        self.ref.precise.discard(name)

    @precondition(lambda self: len(self.router.pods) > 0)
    @rule(tokens=TOKENS, dt=st.floats(0, 4))
    def route(self, tokens: list[int], dt: float) -> None:
        self.clock.now += dt
        ids, paths = self.chain(tokens)
        prompt = tuple(tokens)
        match = self.router.tree.match(ids, self.router.pods.all_mask)
        for name in self.members():
            pod = self.router.pods.get(name)
            assert pod is not None
            assert match.matched(pod.bit) == self.ref.depth(name, prompt), name
        d = self.router.route(ids)
        assert d.matched_blocks == self.ref.depth(d.member_id, prompt)
        self.router.release(d.request_id)
        if d.member_id in self.ref.precise:
            self.ref.hold(d.member_id, paths[: d.matched_blocks], self.clock.now)
        else:
            self.ref.hold(d.member_id, paths, self.clock.now)

    def _switch_precise(self, name: str) -> None:
        if name not in self.ref.precise:
            self.ref.precise.add(name)
            self.ref.drop(name, self.ref.paths_of(name))

    @precondition(lambda self: len(self.router.pods) > 0)
    @rule(data=st.data(), tokens=TOKENS, cut=st.integers(0, 7))
    def stored(self, data: st.DataObject, tokens: list[int], cut: int) -> None:
        name = data.draw(st.sampled_from(self.members()))
        ids, paths = self.chain(tokens)
        cut = min(cut, len(ids))
        parent = ids[cut - 1] if cut else 0
        result = self.router.apply_events(name, [Stored(parent, ids[cut:])])
        self._switch_precise(name)
        self.ref.indexed &= self.ref.closure()
        if cut and paths[cut - 1] not in self.ref.indexed:
            assert result.ignored == 1
        else:
            assert result.applied == 1
            self.ref.hold(name, paths[cut:], self.clock.now)
            self.ref.indexed.update(paths[cut:])

    @precondition(lambda self: len(self.router.pods) > 0)
    @rule(data=st.data(), tokens=TOKENS)
    def removed(self, data: st.DataObject, tokens: list[int]) -> None:
        name = data.draw(st.sampled_from(self.members()))
        ids, paths = self.chain(tokens)
        picked = data.draw(st.lists(st.sampled_from(range(len(ids))), unique=True)) if ids else []
        self.router.apply_events(name, [Removed([ids[i] for i in picked])])
        self._switch_precise(name)
        self.ref.drop(name, [paths[i] for i in picked])

    @precondition(lambda self: len(self.router.pods) > 0)
    @rule(data=st.data())
    def cleared(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.members()))
        self.router.apply_events(name, [Cleared()])
        self._switch_precise(name)
        self.ref.drop(name, self.ref.paths_of(name))

    @rule(dt=st.floats(0, 12))
    def expire(self, dt: float) -> None:
        self.clock.now += dt
        cutoff = self.clock.now - 10
        for name in self.members():
            self.router.expire_pod(name)
            if name not in self.ref.precise:
                old = [p for p, h in self.ref.held.items() if name in h and h[name] < cutoff]
                self.ref.drop(name, old)

    @rule(count=st.integers(0, 6))
    def evict(self, count: int) -> None:
        before = self.ref.closure()
        evicted = self.router.tree.evict(count)
        assert len(evicted) >= min(count, len(before))
        for bid in evicted:
            path = self.paths[bid]
            assert path in before
            current = self.ref.closure()
            if path in current:
                # A leaf at the moment it goes.
                assert not any(len(p) == len(path) + 1 and p[:-1] == path for p in current), path
            self.ref.held.pop(path, None)

    @invariant()
    def same_structure_holders_and_stamps(self) -> None:
        tree = self.router.tree
        closure = self.ref.closure()
        # A prefix that left the tree is no longer an event's possible parent.
        self.ref.indexed &= closure
        assert set(tree.block_ids()) == {self.ids[p] for p in closure}
        for path in closure:
            bid = self.ids[path]
            holders = self.ref.held.get(path, {})
            parent = tree.parent_of(bid)
            assert parent == (self.ids[path[:-1]] if len(path) > 1 else None)
            mask = 0
            for name, stamp in holders.items():
                pod = self.router.pods.get(name)
                assert pod is not None
                mask |= pod.bit
                assert tree.last_used(pod.slot, bid) == stamp
            assert tree.holders(bid) == mask, path
        for name in self.members():
            pod = self.router.pods.get(name)
            assert pod is not None
            assert tree.pod_blocks(pod.slot) == len(self.ref.paths_of(name))


TestTreeAgainstReference = TreeMachine.TestCase
TestTreeAgainstReference.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
