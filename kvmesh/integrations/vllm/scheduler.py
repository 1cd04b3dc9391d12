"""The connector's scheduler side: how many blocks the mesh adds to a request's local prefix hit,
and which blocks the workers load and save each step.

One mesh round trip per new request (Exists on its full prompt blocks, fanned out to the nodes
at once, bounded by `lookup_timeout_s`); no answer means no external hit, so the request is
computed. Only prompt blocks are cached, and at least the prompt's last token is always left to
compute (vLLM must run the model on something to sample the first output token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmesh.blocks import BlockHasher
from kvmesh.integrations.link import MeshLink
from kvmesh.integrations.vllm.keys import block_keys, shard_key
from kvmesh.integrations.vllm.plan import BlockTransfer, StepPlan
from kvmesh.integrations.vllm.settings import ConnectorSettings
from kvmesh.integrations.vllm.stats import ConnectorStats


@dataclass
class _Tracked:
    """A request the connector follows from its first lookup to its end."""

    keys: list[bytes]
    prompt_len: int
    mesh_prefix: int | None = None  # leading blocks present in the mesh at lookup (None: not asked)
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # blocks below this are in the mesh or already handed to a worker to save
    started: bool = False


def _lora_name(request: Any) -> str | None:
    lora = getattr(request, "lora_request", None)
    return getattr(lora, "lora_name", None) if lora is not None else None


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings, link: MeshLink, blocks: BlockHasher,
                 shards: int, stats: ConnectorStats) -> None:
        self._settings = settings
        self._link = link
        self._blocks = blocks
        self._block_size = blocks.block_size
        self._shards = shards
        self._stats = stats
        self._requests: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, int] = {}

    def _track(self, request: Any) -> _Tracked | None:
        tracked = self._requests.get(request.request_id)
        if tracked is not None:
            return tracked
        prompt = list(request.prompt_token_ids or [])
        if not prompt or getattr(request, "mm_features", None):
            return None  # multimodal KV depends on more than token ids: not cached
        keys = block_keys(self._blocks, prompt, _lora_name(request), getattr(request, "cache_salt", None))
        tracked = self._requests[request.request_id] = _Tracked(keys, len(prompt))
        return tracked

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens beyond the local hit whose blocks the mesh holds (a whole number of blocks)."""
        tracked = self._track(request)
        if tracked is None:
            return 0
        loadable = min(len(tracked.keys), (tracked.prompt_len - 1) // self._block_size)
        local = num_computed_tokens // self._block_size
        if loadable <= local:
            return 0
        if tracked.mesh_prefix is None:
            probe = [shard_key(k, 0, self._shards) for k in tracked.keys[:loadable]]
            answer = self._link.call(lambda client: client.exists_prefix(probe), self._settings.lookup_timeout_s)
            if answer is None:
                self._stats.add(lookups=1, lookup_failures=1)
                return 0  # and ask again next time the scheduler does
            tracked.mesh_prefix = int(answer)
            self._stats.add(lookups=1, lookup_hit_blocks=max(0, tracked.mesh_prefix - local))
        return max(0, tracked.mesh_prefix - local) * self._block_size

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0 and request.request_id in self._requests:
            self._pending_loads[request.request_id] = num_external_tokens

    def plan(self, scheduler_output: Any) -> StepPlan:
        """The step's loads (blocks vLLM counted as external hits) and saves (prompt blocks that
        this step completes and the mesh lacks)."""
        plan = StepPlan()
        bs = self._block_size
        scheduled: dict[str, int] = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            computed = new.num_computed_tokens
            external = self._pending_loads.pop(new.req_id, 0)
            if external:
                first, last = (computed - external) // bs, computed // bs
                plan.loads.append(BlockTransfer(new.req_id, tracked.keys[first:last], tracked.block_ids[first:last]))
            # Blocks the mesh lacks are saved once computed, local hits included (a node that
            # lost them gets them back); blocks the mesh holds are not sent again.
            held = tracked.mesh_prefix if tracked.mesh_prefix is not None else computed // bs
            tracked.saved = min(held, computed // bs)
            tracked.started = True
            self._plan_saves(plan, new.req_id, tracked, computed + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Preempted and resumed: vLLM looked it up again and gives all its blocks anew;
                # load what it counted as external hits, and stop saving it (a cache may skip).
                tracked.block_ids = list(new_ids[0]) if new_ids is not None else []
                computed = cached.num_computed_tokens[i]
                external = self._pending_loads.pop(req_id, 0)
                if external:
                    first, last = (computed - external) // bs, computed // bs
                    plan.loads.append(BlockTransfer(req_id, tracked.keys[first:last], tracked.block_ids[first:last]))
                tracked.saved = len(tracked.keys)
                tracked.started = True
                continue
            if not tracked.started:
                continue
            if new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            self._plan_saves(plan, req_id, tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return plan

    def _plan_saves(self, plan: StepPlan, req_id: str, tracked: _Tracked, computed_after: int) -> None:
        done = min(min(computed_after, tracked.prompt_len) // self._block_size, len(tracked.keys),
                   len(tracked.block_ids))
        if done > tracked.saved:
            lo = tracked.saved
            plan.saves.append(BlockTransfer(req_id, tracked.keys[lo:done], tracked.block_ids[lo:done]))
            tracked.saved = done

    def finished(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._pending_loads.pop(request_id, None)
