"""A continuous-batching inference engine, simulated step by step on an abstract clock.

The same core runs in the `kvmesh enginesim` process (driven by the wall clock, compressed by
`--speedup`) and inside `kvmesh bench trace` (driven by a virtual clock, so an hour of trace
replays in seconds). It never sleeps or reads a clock itself: the driver calls
`run_until(t)`, which executes every step that starts before `t` and returns what happened
(first tokens, finishes, blocks stored and evicted) with the simulated time of each.

Scheduling follows vLLM's v1 scheduler with chunked prefill: each step first gives one token
to every decoding sequence, then continues partial prefills, then admits waiting requests in
arrival order while the token budget, the sequence limit and the KV memory allow. Runs of
identical decode-only steps are executed in one go (their count is known), which keeps a
full-trace replay fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from kvmesh.services.enginesim.prefix_cache import Allocation, PrefixCache
from kvmesh.services.enginesim.timing import TimingModel, attention_pairs


class EventKind(Enum):
    FIRST_TOKEN = "first_token"
    FINISHED = "finished"
    STORED = "stored"
    REMOVED = "removed"


@dataclass
class SimRequest:
    """One request inside the engine; times are simulated milliseconds."""

    request_id: str
    blocks: list[int]
    input_tokens: int
    output_tokens: int
    arrival_ms: float
    local_hit_blocks: int = 0
    pool_hit_blocks: int = 0
    ready_ms: float = 0.0
    cached_tokens: int = 0
    prefilled: int = 0
    generated: int = 0
    admitted_ms: float | None = None
    first_token_ms: float | None = None
    finish_ms: float | None = None
    pin: Allocation | None = None
    allocation: Allocation | None = None

    @property
    def prefill_remaining(self) -> int:
        return self.input_tokens - self.prefilled

    @property
    def context(self) -> int:
        return self.prefilled + self.generated

    @property
    def computed_blocks(self) -> int:
        return max(len(self.blocks) - self.local_hit_blocks - self.pool_hit_blocks, 0)

    @property
    def queue_ms(self) -> float:
        return (self.admitted_ms or self.ready_ms) - self.arrival_ms

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ms or 0.0) - self.arrival_ms

    @property
    def e2e_ms(self) -> float:
        return (self.finish_ms or 0.0) - self.arrival_ms


@dataclass
class EngineEvent:
    time_ms: float
    kind: EventKind
    request: SimRequest | None = None
    blocks: list[int] = field(default_factory=list)


class BatchingEngine:
    """The scheduler and KV memory of one simulated engine."""

    def __init__(self, timing: TimingModel, capacity_blocks: int, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be positive")
        self.timing = timing
        self.block_tokens = block_tokens
        self.cache = PrefixCache(capacity_blocks)
        self.clock_ms = 0.0  # when the engine is next free to start a step
        self.waiting: list[SimRequest] = []
        self.prefilling: list[SimRequest] = []
        self.decoding: list[SimRequest] = []
        self.steps = 0
        self.busy_ms = 0.0

    # ---- load, as reported through KeepAlive
    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.cache.used / self.cache.capacity

    # ---- request intake
    def lookup(self, blocks: Sequence[int]) -> int:
        """Blocks of this prompt's prefix already computed in GPU memory."""
        return self.cache.match(blocks)

    def submit(
        self, request: SimRequest, now_ms: float, local_hit_blocks: int, pool_hit_blocks: int = 0
    ) -> None:
        """Queues `request` (arrived at `now_ms`). Its local hits are pinned now so they cannot be
        evicted while it waits; pool hits are copied in first, which delays it by the transfer."""
        request.arrival_ms = now_ms
        request.local_hit_blocks = local_hit_blocks
        request.pool_hit_blocks = pool_hit_blocks
        request.pin = self.cache.allocate(request.blocks[:local_hit_blocks], 0)
        hit_tokens = (local_hit_blocks + pool_hit_blocks) * self.block_tokens
        # The last prompt token is always computed: it produces the first output token.
        request.cached_tokens = max(min(hit_tokens, request.input_tokens - 1), 0)
        request.prefilled = request.cached_tokens
        request.ready_ms = now_ms + self.timing.pool_fetch_ms(pool_hit_blocks * self.block_tokens)
        self.waiting.append(request)

    # ---- simulation
    def run_until(self, t_ms: float) -> list[EngineEvent]:
        """Executes every step that starts before `t_ms`; returns the events, in time order."""
        events: list[EngineEvent] = []
        while True:
            start = self._next_start()
            if start is None or start >= t_ms:
                break
            if not self.prefilling and not self._admittable(start):
                self._decode_run(start, t_ms, events)
            else:
                self._step(start, events)
        return events

    def next_activity_ms(self) -> float | None:
        """When the next step would start, or None when idle with nothing queued."""
        return self._next_start()

    def _next_start(self) -> float | None:
        if self.running:
            return self.clock_ms
        if not self.waiting:
            return None
        return max(self.clock_ms, min(r.ready_ms for r in self.waiting))

    def _admittable(self, start: float) -> bool:
        head = self._first_ready(start)
        if head is None or self.running >= self.timing.max_running:
            return False
        return self._fits(head)

    def _fits(self, request: SimRequest) -> bool:
        # An idle engine always takes the head request, even one larger than its memory.
        return self.running == 0 or self.cache.can_allocate(request.blocks, self._private_blocks(request))

    def _first_ready(self, start: float) -> SimRequest | None:
        for r in self.waiting:
            if r.ready_ms <= start:
                return r
        return None

    def _refresh_hits(self, r: SimRequest) -> None:
        """Prefix hits are final when the request is scheduled (as in vLLM), not when it arrived:
        blocks computed meanwhile by an earlier request with the same prefix count as local."""
        now_local = self.cache.match(r.blocks)
        if now_local <= r.local_hit_blocks:
            return
        covered = max(r.local_hit_blocks + r.pool_hit_blocks, now_local)
        r.local_hit_blocks = now_local
        r.pool_hit_blocks = covered - now_local
        r.cached_tokens = max(min(covered * self.block_tokens, r.input_tokens - 1), 0)
        r.prefilled = r.cached_tokens

    def _private_blocks(self, request: SimRequest) -> int:
        return math.ceil(request.output_tokens / self.block_tokens)

    def _step(self, start: float, events: list[EngineEvent]) -> None:
        timing = self.timing
        budget = timing.max_batched_tokens - len(self.decoding)
        decode_ctx = float(sum(r.context for r in self.decoding))
        chunks: list[tuple[SimRequest, int]] = []
        for r in self.prefilling:
            if budget <= 0:
                break
            take = min(r.prefill_remaining, budget)
            chunks.append((r, take))
            budget -= take
        while budget > 0 and self.running < timing.max_running:
            head = self._first_ready(start)
            if head is None or not self._fits(head):
                break
            self.waiting.remove(head)
            self._refresh_hits(head)
            head.allocation = self.cache.allocate(head.blocks, self._private_blocks(head))
            if head.pin is not None:
                self.cache.release(head.pin)
                head.pin = None
            head.admitted_ms = start
            self.prefilling.append(head)
            take = min(head.prefill_remaining, budget)
            chunks.append((head, take))
            budget -= take
        prefill_tokens = sum(take for _, take in chunks)
        pairs = sum(attention_pairs(r.prefilled, r.prefilled + take) for r, take in chunks)
        dt = timing.step_ms(prefill_tokens, pairs, len(self.decoding), decode_ctx)
        end = start + dt
        self.steps += 1
        self.busy_ms += dt
        self.clock_ms = end
        self._emit_evictions(end, events)
        still_decoding: list[SimRequest] = []
        for r in self.decoding:
            r.generated += 1
            if r.generated >= r.output_tokens:
                self._finish(r, end, events)
            else:
                still_decoding.append(r)
        for r, take in chunks:
            r.prefilled += take
            if r.prefill_remaining > 0:
                continue
            self.prefilling.remove(r)
            r.first_token_ms = end
            r.generated = 1
            events.append(EngineEvent(end, EventKind.FIRST_TOKEN, r))
            assert r.allocation is not None
            if self.cache.commit(r.allocation):
                # The whole cached chain, root first: a receiver can insert it as one path.
                chain = r.blocks[: self.cache.match(r.blocks)]
                events.append(EngineEvent(end, EventKind.STORED, r, chain))
            if r.generated >= r.output_tokens:
                self._finish(r, end, events)
            else:
                still_decoding.append(r)
        self.decoding = still_decoding

    def _decode_run(self, start: float, limit: float, events: list[EngineEvent]) -> None:
        """Several identical decode-only steps at once: until the first sequence finishes, a
        waiting request becomes ready, or the driver's horizon `limit` is reached."""
        n = len(self.decoding)
        ctx0 = float(sum(r.context for r in self.decoding))
        steps_left = min(r.output_tokens - r.generated for r in self.decoding)
        horizon = limit
        pending = [r.ready_ms for r in self.waiting if r.ready_ms > start]
        if pending:
            horizon = min(horizon, min(pending))
        d0 = self.timing.step_ms(0, 0.0, n, ctx0)
        fit = (horizon - start) / d0
        k = steps_left if math.isinf(fit) else max(1, min(steps_left, math.ceil(fit)))
        dt = self.timing.step_ms(0, 0.0, n, ctx0 + n * (k - 1) / 2.0)
        end = start + k * dt
        self.steps += k
        self.busy_ms += k * dt
        self.clock_ms = end
        still: list[SimRequest] = []
        for r in self.decoding:
            r.generated += k
            if r.generated >= r.output_tokens:
                self._finish(r, end, events)
            else:
                still.append(r)
        self.decoding = still

    def _finish(self, r: SimRequest, end: float, events: list[EngineEvent]) -> None:
        r.finish_ms = end
        if r.allocation is not None:
            self.cache.release(r.allocation)
        events.append(EngineEvent(end, EventKind.FINISHED, r))
        self._emit_evictions(end, events)

    def _emit_evictions(self, at: float, events: list[EngineEvent]) -> None:
        evicted = self.cache.drain_evicted()
        if evicted:
            events.append(EngineEvent(at, EventKind.REMOVED, None, evicted))


def offloaded_blocks(r: SimRequest) -> list[int]:
    """What an engine writes to the cache pool after prefill: every prompt block it did not just
    read from there (its local hits refresh their pool copies, its computed blocks are new)."""
    fetched_end = r.local_hit_blocks + r.pool_hit_blocks
    return r.blocks[: r.local_hit_blocks] + r.blocks[fetched_end:]
