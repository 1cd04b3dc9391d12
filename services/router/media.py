"""Storage media (GPU, CPU, ...) of an engine's KV blocks: tiers and their weights in scoring.

vLLM reports each stored or removed block with a `medium` ("GPU", or "CPU" once offloading
copies blocks to host memory). A block held only in a slower medium must be loaded back before
it saves any prefill, so it is worth less in a prefix score. `--kv-medium-weights` names the
media the router tells apart and what a matched block in each is worth (`GPU=1.0,CPU=0.5` by
default). Tier 0 is always the GPU tier; an absent, empty or unlisted medium counts as GPU, so
an engine that never says where its blocks live is scored exactly as before.

The tree stores, per node, only the pods whose copy is in a tier other than 0 (most nodes: none),
and the ingest keeps one small bitset of media per engine block only while a block is held by
something other than the GPU alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIMARY = "GPU"
MAX_MEDIA = 8  # media told apart (bits of one small int per engine block)
DEFAULT_MEDIUM_WEIGHTS = "GPU=1.0,CPU=0.5"


def parse_weights(spec: str) -> dict[str, float]:
    """`NAME=WEIGHT,...` → {NAME (upper case): weight}; ValueError on a malformed list."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().upper()
        if not sep or not name:
            raise ValueError(f"{item!r} is not MEDIUM=WEIGHT")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: weight is not a number") from None
        if not math.isfinite(weight) or weight < 0 or weight > 1_000_000:
            raise ValueError(f"{item!r}: weight must be between 0 and 1e6")
        if name in out:
            raise ValueError(f"medium {name!r} listed twice")
        out[name] = weight
    if len(out) + (PRIMARY not in out) > MAX_MEDIA:
        raise ValueError(f"at most {MAX_MEDIA} media")
    return out


@dataclass(frozen=True, slots=True)
class MediumTable:
    """Medium names → tier numbers (0 = GPU) and the weight of a matched block in each tier.

    Ingest keeps a bitset per engine block: bit i for tier i's medium, plus one bit (`other`)
    shared by every unlisted medium, which is weighted like the GPU tier.
    """

    names: tuple[str, ...]  # tier → medium name; names[0] == "GPU"
    weights: tuple[float, ...]  # tier → weight

    @classmethod
    def from_spec(cls, spec: str = DEFAULT_MEDIUM_WEIGHTS) -> MediumTable:
        parsed = parse_weights(spec)
        names = (PRIMARY, *(n for n in parsed if n != PRIMARY))
        return cls(names, tuple(parsed.get(n, 1.0) for n in names))

    @property
    def other_bit(self) -> int:
        return 1 << len(self.names)

    def bit(self, medium: str) -> int:
        """The ingest's bit for `medium` (absent or empty: GPU)."""
        if not medium:
            return 1
        try:
            return 1 << self.names.index(medium.upper())
        except ValueError:
            return self.other_bit

    def best_tier(self, bits: int) -> int:
        """The tier that counts for a block held in the media `bits`: the highest weight wins
        (ties: the lower tier); an unlisted medium counts as tier 0."""
        best, weight = -1, -1.0
        for tier, w in enumerate(self.weights):
            if bits >> tier & 1 and w > weight:
                best, weight = tier, w
        if bits & self.other_bit and self.weights[0] > weight:
            best = 0
        return max(best, 0)

    @property
    def uniform(self) -> bool:
        """Every tier weighs the same: scoring can ignore tiers."""
        return len(set(self.weights)) <= 1
