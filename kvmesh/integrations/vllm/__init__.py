"""vLLM KV connector: `--kv-transfer-config '{"kv_connector":"KvmeshConnector",
"kv_connector_module_path":"kvmesh.integrations.vllm","kv_role":"kv_both",
"kv_connector_extra_config":{"metadata":"HOST:PORT","namespace":"..."}}'` (docs/integrations.md).

vLLM is imported only when the connector class is asked for, so the key and codec modules load
without it (tests and tools compute the same keys).
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvmeshConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvmeshConnector":
        from kvmesh.integrations.vllm.connector import KvmeshConnector

        return KvmeshConnector
    raise AttributeError(name)
