"""What a routing policy sees and returns.

A policy gets a `RouteContext` (the candidate pods, their loads, how much of the prompt each
already holds) and returns one slot. It never mutates the tree or the pod table: the core
does the bookkeeping after the choice, so every policy gets the same approximate learning
and in-flight accounting.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from kvmesh.services.router.pods import PodTable
from kvmesh.services.router.settings import RouterSettings
from kvmesh.services.router.tree import Match, PrefixTree


class RouteContext:
    """One routing decision's inputs; `depths()` and `loads()` are computed on first use."""

    __slots__ = ("_depths", "_loads", "_scores", "mask", "match", "pods", "slots", "tree", "weights")

    def __init__(
        self, pods: PodTable, tree: PrefixTree, mask: int, match: Match, weights: Sequence[float] = (1.0,)
    ) -> None:
        self.pods = pods
        self.weights = weights
        self.mask = mask
        slots = pods.slots_of(mask)
        self.tree = tree
        self.slots = slots
        self.match = match
        self._depths: dict[int, int] | None = None
        self._loads: tuple[int, ...] | None = None
        self._scores: dict[int, float] | None = None

    @property
    def total(self) -> int:
        return self.match.total

    def loads(self) -> tuple[int, ...]:
        """Load of each candidate, in `slots` order."""
        if self._loads is None:
            self._loads = self.pods.loads_of(self.mask)
        return self._loads

    def depths(self) -> dict[int, int]:
        """Slot → blocks of the prompt that pod holds, counted from the first (absent: 0)."""
        if self._depths is None:
            out: dict[int, int] = {}
            match = self.match
            for depth, mask in match.levels:
                if depth:
                    while mask:
                        low = mask & -mask
                        out[low.bit_length() - 1] = depth
                        mask ^= low
            if match.depth:
                mask = match.full
                depth = match.depth
                while mask:
                    low = mask & -mask
                    out[low.bit_length() - 1] = depth
                    mask ^= low
            self._depths = out
        return self._depths

    def scores(self) -> dict[int, float]:
        """Slot → the pod's matched blocks weighted by the medium each is held in (absent: 0).

        Equal to `depths()` when every matched copy is in GPU memory at weight 1 (the usual
        case, and then no extra work is done)."""
        scores = self._scores
        if scores is None:
            depths: dict[int, float] = self.depths()  # type: ignore[assignment]  # ints are valid scores
            match, weights = self.match, self.weights
            if not match.lows and weights[0] == 1.0:
                scores = depths
            else:
                scores = {slot: match.score(1 << slot, weights) for slot in depths}
            self._scores = scores
        return scores

    def best(self) -> tuple[float, list[int]]:
        """(score, slots) of the pods with the highest weighted match (score 0: nobody matched)."""
        scores = self.scores()
        top = max(scores.values(), default=0)
        if not top:
            return 0.0, []
        return top, [slot for slot, score in scores.items() if score == top]


class Policy(ABC):
    """Chooses one slot among `ctx.slots` (never empty)."""

    name: ClassVar[str]

    def __init__(self, settings: RouterSettings, rng: random.Random) -> None:
        self.settings = settings
        self.rng = rng

    @abstractmethod
    def choose(self, ctx: RouteContext) -> int: ...

    def least_loaded(self, slots: Sequence[int], loads: Sequence[int]) -> int:
        """The least-loaded of `slots` (loads in the same order); ties broken at random."""
        low = min(loads)
        ties = [s for s, load in zip(slots, loads, strict=True) if load == low]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)
