"""Turns one engine's decoded KV events into the router's own block ids and applies them.

vLLM names blocks by its own hash (which depends on its hash seed and algorithm), so the
router computes its own chained key from each stored block's `token_ids` with
`kvmesh.blocks` (the same keys a `Route` by tokens computes) and remembers engine hash → own
key per pod. A block is held while any medium (GPU, CPU, ...) holds it, and the tree is told
the tier that counts for it (the best-weighted medium holding it: `media.py`) whenever that
changes: a stored copy in a new medium, a removed copy while another stays. The pod's last
sequence number and batch timestamp tell a gap (replay), a duplicate (skip) and a restarted
engine (its sequence went back with a newer timestamp: drop its blocks and resync) apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from kvmesh.blocks import block_id, block_ids
from kvmesh.services.router.core import Cleared, KvEvent, Removed, Retiered, RouterCore, Stored
from kvmesh.services.router.kv_events.decode import (
    EngineCleared,
    EngineEvent,
    EngineHash,
    EngineRemoved,
    EngineStored,
)
from kvmesh.services.router.shards import ShardedDict

_ROOT_KEY = b"\x00" * 16
_GPU = 1  # the media bit of tier 0 (`MediumTable.bit("GPU")`)


class Verdict(Enum):
    NEXT = "next"  # the expected next batch
    FIRST = "first"  # first batch seen from this pod
    GAP = "gap"  # batches were missed: replay them
    DUPLICATE = "duplicate"  # already applied (seen again after a replay)
    RESTART = "restart"  # the engine restarted: its sequence starts again


@dataclass
class PodStream:
    """What the router knows of one engine's event stream."""

    member_id: str
    # engine hash → own 16-byte key; one entry per block, so sharded (no long resize)
    keys: ShardedDict[EngineHash, bytes] = field(default_factory=ShardedDict)
    # Media bits (`MediumTable.bit`) of the blocks held by anything but the GPU alone.
    media: dict[EngineHash, int] = field(default_factory=dict)
    seq: int = -1
    ts: float = 0.0
    synced: bool = False  # caught up with the engine's replay buffer once (warm)
    batches: int = 0
    replays: int = 0
    restarts: int = 0

    def verdict(self, seq: int, ts: float) -> Verdict:
        if self.seq < 0:
            return Verdict.FIRST
        if seq == self.seq + 1:
            return Verdict.NEXT
        if seq > self.seq:
            return Verdict.GAP
        # Sequence went back: a replayed batch seen again, or a restarted engine (newer time).
        if ts > self.ts or (ts == 0.0 and seq == 0):
            return Verdict.RESTART
        return Verdict.DUPLICATE

    def reset(self) -> None:
        self.keys.clear()
        self.media.clear()
        self.seq = -1
        self.ts = 0.0


def engine_slices(events: list[EngineEvent], budget: int) -> Iterator[list[EngineEvent]]:
    """Cuts events into slices of about `budget` blocks; long stored runs are cut into chained pieces."""
    piece: list[EngineEvent] = []
    used = 0
    for event in events:
        if isinstance(event, EngineStored) and len(event.hashes) > budget and event.block_size > 0:
            parent, bs = event.parent, event.block_size
            for start in range(0, len(event.hashes), budget):
                part = event.hashes[start : start + budget]
                if piece:
                    yield piece
                    piece, used = [], 0
                tokens = event.tokens[4 * start * bs : 4 * (start + len(part)) * bs]
                yield [EngineStored(part, parent, tokens, bs, event.medium)]
                parent = part[-1]
            continue
        cost = len(event.hashes) if isinstance(event, EngineStored | EngineRemoved) else 1
        if piece and used + cost > budget:
            yield piece
            piece, used = [], 0
        piece.append(event)
        used += max(cost, 1)
    if piece:
        yield piece


@dataclass
class IngestCounters:
    stored_blocks: int = 0
    removed_blocks: int = 0
    ignored: int = 0
    last_ignored: str = ""


class EventIngest:
    """Applies engine events to a `RouterCore`, keeping each pod's hash map within bounds."""

    def __init__(self, core: RouterCore, max_blocks_per_pod: int) -> None:
        self.core = core
        self.max_blocks_per_pod = max_blocks_per_pod
        self.streams: dict[str, PodStream] = {}
        self.counters = IngestCounters()
        self._bits: dict[str, int] = {}  # medium name → media bit (names seen, bounded)

    def _bit(self, medium: str) -> int:
        bit = self.core.media.bit(medium)
        if len(self._bits) < 64:  # an engine inventing names cannot grow the cache
            self._bits[medium] = bit
        return bit

    def stream(self, member_id: str) -> PodStream:
        s = self.streams.get(member_id)
        if s is None:
            s = self.streams[member_id] = PodStream(member_id)
        return s

    def forget(self, member_id: str) -> None:
        self.streams.pop(member_id, None)

    def _ignore(self, why: str) -> None:
        self.counters.ignored += 1
        self.counters.last_ignored = why

    def restart(self, member_id: str) -> None:
        """The engine restarted: everything it held is gone."""
        s = self.stream(member_id)
        s.reset()
        s.restarts += 1
        s.synced = False
        if member_id in self.core.pods:
            self.core.apply_events(member_id, [Cleared()])

    def apply(self, member_id: str, events: list[EngineEvent]) -> None:
        """Applies one slice of events (the caller keeps slices small)."""
        pod = self.core.pods.get(member_id)
        if pod is None:
            self._ignore(f"events of unknown engine {member_id!r}")
            return
        s = self.stream(member_id)
        hasher = self.core.hasher(pod.model)
        block_size = self.core.settings.block_size
        out: list[KvEvent] = []
        keys, media = s.keys, s.media
        table = self.core.media
        bits = self._bits
        # The last stored run appended to `out`: a stored event that chains on from its last
        # engine hash (vLLM's next block of the same request) extends it instead of adding an
        # event, so the tree places one longer chain (its cost is per event, not per block).
        run: Stored | None = None
        run_tail: EngineHash | None = None
        run_ids: list[int] = []
        for event in events:
            if isinstance(event, EngineStored):
                if event.block_size != block_size:
                    self._ignore(f"block_size {event.block_size} is not the router's --block-size {block_size}")
                    continue
                if event.parent is None:
                    parent_key = _ROOT_KEY
                else:
                    found = keys.get(event.parent)
                    if found is None:
                        self._ignore("stored chain with an unknown parent")
                        continue
                    parent_key = found
                own = hasher.packed_keys(event.tokens, parent_key)  # ids arrive packed (`decode.py`)
                if len(own) != len(event.hashes):
                    self._ignore("stored event whose token_ids do not fill its blocks")
                    continue
                bit = bits.get(event.medium) or self._bit(event.medium)
                ids = block_ids(own)
                tier = table.best_tier(bit) if bit != _GPU else 0
                moved: dict[int, list[int]] | None = None
                if bit != _GPU or media:  # blocks only on the GPU (the usual case) need no entry
                    for h, bid in zip(event.hashes, ids, strict=True):
                        held = media.get(h, _GPU if h in keys else 0) | bit
                        if held == _GPU:
                            media.pop(h, None)
                            continue
                        media[h] = held
                        best = table.best_tier(held)
                        if best != tier:  # another medium that counts more still holds it
                            moved = moved or {}
                            moved.setdefault(best, []).append(bid)
                keys.update(event.hashes, own)
                self.counters.stored_blocks += len(own)
                if run is not None and out[-1] is run and run_tail is not None and event.parent == run_tail \
                        and run.tier == tier:
                    run_ids.extend(ids)  # our own list, built by `block_ids` for the run's first event
                else:
                    run_ids = ids
                    run = Stored(0 if event.parent is None else block_id(parent_key), run_ids, tier)
                    out.append(run)
                run_tail = event.hashes[-1] if event.hashes else None
                if moved:
                    out.extend(Retiered(bids, t) for t, bids in moved.items())
            elif isinstance(event, EngineRemoved):
                bit = bits.get(event.medium) or self._bit(event.medium)
                gone: list[int] = []
                moved = None
                for h in event.hashes:
                    key = keys.get(h)
                    if key is None:
                        continue
                    before = media.get(h, _GPU)
                    held = before & ~bit
                    if held:  # still on another medium: still a hit, maybe in another tier
                        best = table.best_tier(held)
                        if held == _GPU:
                            media.pop(h, None)
                        else:
                            media[h] = held
                        if best != table.best_tier(before):
                            moved = moved or {}
                            moved.setdefault(best, []).append(block_id(key))
                        continue
                    media.pop(h, None)
                    gone.append(block_id(keys.pop(h)))
                if gone:
                    out.append(Removed(gone))
                    self.counters.removed_blocks += len(gone)
                if moved:
                    out.extend(Retiered(bids, t) for t, bids in moved.items())
            elif isinstance(event, EngineCleared):
                keys.clear()
                media.clear()
                out.append(Cleared())
        over = len(keys) - self.max_blocks_per_pod
        if over > 0:  # bounded: forget the oldest blocks (events were missed, or the bound is low)
            dropped: list[int] = []
            for h in keys.oldest(over):
                dropped.append(block_id(keys.pop(h)))
                media.pop(h, None)
            out.append(Removed(dropped))
        if out:
            self.core.apply_events(member_id, out)
