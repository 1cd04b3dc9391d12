"""The connector's `kv_connector_extra_config`, validated once when vLLM builds the connector."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ConnectorSettings(BaseModel):
    """Keys a user may put in `kv_connector_extra_config` (unknown keys are refused: typos show)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: str | None = Field(None, description="metadata service HOST:PORT (comma-separated replicas); "
                                 "else KVMESH_METADATA")
    nodes: str | None = Field(None, description="static cache nodes ID=HOST:PORT,... instead of metadata")
    namespace: str = Field("", description="cache namespace: engines share blocks only within one")
    model: str | None = Field(None, description="model name in the block keys (default: served model name)")
    replicas: int = Field(1, ge=1, description="cache nodes holding each block")
    lookup_timeout_s: float = Field(0.5, gt=0, description="scheduler: longest wait for the mesh's answer "
                                    "on a new request; past it the request is computed")
    load_timeout_s: float = Field(5.0, gt=0, description="worker: longest wait for a step's blocks; past it "
                                  "they are reported failed and recomputed")
    connect_timeout_s: float = Field(10.0, gt=0, description="one attempt to join the mesh (retried forever "
                                     "in the background)")
    max_pending_saves: int = Field(32, ge=1, description="unfinished background save batches; more are "
                                   "dropped (never queued without bound, never stalling the engine)")
    stats_dir: str | None = Field(None, description="folder for a JSON file of the connector's counters")
    stats_log_interval_s: float = Field(30.0, gt=0, description="how often the counters are logged")
