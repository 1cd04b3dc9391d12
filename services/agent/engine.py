"""What the agent reads from a vLLM OpenAI server: health, served model, load from /metrics.

Plain HTTP GETs with the standard library, run in a worker thread by the caller (they block).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from kvmesh.v1 import common_pb2

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # newer name first
_MAX_BODY = 8 << 20  # a /metrics page larger than this is cut (the load lines come early)


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        if resp.status != 200:
            raise OSError(f"{url}: HTTP {resp.status}")
        return bytes(resp.read(_MAX_BODY))


def healthy(base_url: str, timeout: float) -> bool:
    try:
        _get(f"{base_url}/health", timeout)
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return True


def served_model(base_url: str, timeout: float) -> str:
    """The first model id of /v1/models ('' when none)."""
    body = json.loads(_get(f"{base_url}/v1/models", timeout))
    data = body.get("data") or []
    return str(data[0].get("id", "")) if data else ""


def parse_load(text: str) -> common_pb2.Load:
    """Running and waiting requests and KV usage (0..1) from Prometheus text, summed over labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    usage = next((values[n] for n in KV_USAGE if n in values), 0.0)
    return common_pb2.Load(
        running_requests=max(0, int(values.get(RUNNING, 0.0))),
        waiting_requests=max(0, int(values.get(WAITING, 0.0))),
        kv_usage=min(max(usage, 0.0), 1.0),
    )


def read_load(base_url: str, timeout: float) -> common_pb2.Load:
    return parse_load(_get(f"{base_url}/metrics", timeout).decode("utf-8", "replace"))
