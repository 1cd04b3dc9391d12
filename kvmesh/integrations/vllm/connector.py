"""`KvmeshConnector`: vLLM's KV connector (`KVConnectorBase_V1`, vLLM 0.32) over the kvmesh mesh.

vLLM builds one instance per role: the scheduler's (`SchedulerSide`: lookups and the per-step
plan) and each worker's (`WorkerSide`: copies between paged KV tensors and the mesh). Each owns a
`MeshLink`, a mesh client on its own thread. A cache must never fail inference, so a failed load
is reported through `get_block_ids_with_load_errors` and the connector sets vLLM's
`kv_load_failure_policy` to "recompute" (vLLM's default, "fail", would fail the request).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvmesh.integrations.link import MeshLink
from kvmesh.integrations.mesh import open_client
from kvmesh.integrations.vllm.keys import hasher
from kvmesh.integrations.vllm.plan import StepPlan
from kvmesh.integrations.vllm.scheduler import SchedulerSide
from kvmesh.integrations.vllm.settings import ConnectorSettings
from kvmesh.integrations.vllm.stats import ConnectorStats, summary
from kvmesh.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# Under "vllm." so the lines show in vLLM's own log output, formatted as vLLM formats its own.
log = logging.getLogger("vllm.kvmesh")


class KvmeshConnectorMetadata(KVConnectorMetadata):
    """The scheduler's plan for one step, as vLLM hands it to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def _served_model(vllm_config: VllmConfig) -> str:
    served = vllm_config.model_config.served_model_name
    if isinstance(served, list | tuple):
        served = served[0] if served else None
    return str(served or vllm_config.model_config.model)


def _shard(vllm_config: VllmConfig, role: KVConnectorRole) -> tuple[int, int]:
    """(this worker's shard, shards): tensor- and pipeline-parallel ranks each hold their own KV."""
    parallel = vllm_config.parallel_config
    shards = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if role != KVConnectorRole.WORKER or shards == 1:
        return 0, shards
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    return get_pp_group().rank_in_group * parallel.tensor_parallel_size + get_tensor_model_parallel_rank(), shards


class KvmeshConnector(KVConnectorBase_V1):
    """Loads prompt blocks other engines computed from the mesh; saves the ones it computes."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._settings = ConnectorSettings(**(transfer.kv_connector_extra_config or {}))
        if transfer.kv_load_failure_policy != "recompute":
            log.info("kvmesh connector: kv_load_failure_policy %r -> 'recompute' (a cache miss must not fail "
                     "a request)", transfer.kv_load_failure_policy)
            transfer.kv_load_failure_policy = "recompute"
        s = self._settings
        role_name = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        self._stats = ConnectorStats(role_name, s.stats_dir, s.stats_log_interval_s)
        connect = functools.partial(open_client, s.metadata, s.nodes, s.namespace,
                                    sync_timeout_s=s.connect_timeout_s, replicas=s.replicas)
        self._link = MeshLink(connect, name=f"kvmesh-vllm-{role_name}", max_pending=s.max_pending_saves, logger=log)
        rank, shards = _shard(vllm_config, role)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1
        if groups != 1:
            log.warning("kvmesh connector disabled: %d KV cache groups (hybrid models are not supported)", groups)
            return
        if role == KVConnectorRole.SCHEDULER:
            blocks = hasher(s.model or _served_model(vllm_config), s.namespace, vllm_config.cache_config.block_size)
            self._scheduler = SchedulerSide(s, self._link, blocks, shards, self._stats)
        else:
            num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else 0
            self._worker = WorkerSide(s, self._link, self._stats, rank, shards, num_blocks)
        self._link.start()
        log.info("kvmesh connector (%s): namespace %r, mesh %s", role_name, s.namespace,
                 s.metadata or s.nodes or "from KVMESH_METADATA")

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future cache miss, nothing more

    # -- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._worker is not None:
            self._worker.register(kv_caches)

    def _plan(self) -> StepPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, KvmeshConnectorMetadata) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if self._worker is not None and plan is not None:
            self._worker.load(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved once all layers are written, in wait_for_save

    def wait_for_save(self) -> None:
        plan = self._plan()
        if self._worker is not None and plan is not None:
            self._worker.save(plan)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        self._link.close()
        log.info("kvmesh connector (%s) closed: %s", self._stats.role, summary(self._stats.snapshot()))

    # -- scheduler side --------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        plan = self._scheduler.plan(scheduler_output) if self._scheduler is not None else StepPlan()
        return KvmeshConnectorMetadata(plan)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is not None:
            self._scheduler.finished(request.request_id)
        return False, None
