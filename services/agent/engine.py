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


def metric_sums(text: str, prefix: str = "") -> dict[str, float]:
    """Prometheus text's sample values by name (labels summed away), for names starting with `prefix`.

    Lenient on purpose: a line that does not parse is skipped, never the whole page, so one odd
    metric cannot hide the load. A sample line is `name[{labels}] value [timestamp]`, and label
    values may hold spaces, so the value is the first field after the labels, not the last one.
    """
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix) or line.startswith("#"):
            continue
        name, brace, labelled = line.partition("{")
        if brace:
            fields = labelled[_labels_end(labelled) :].split()
        else:
            name, *fields = line.split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        values[name] = values.get(name, 0.0) + value
    return values


def _labels_end(labelled: str) -> int:
    """Where the label set ends: just past its closing brace, skipping braces inside quoted values."""
    quoted = escaped = False
    for i, ch in enumerate(labelled):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = quoted
        elif ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return i + 1
    return len(labelled)


def parse_load(text: str) -> common_pb2.Load:
    """Running and waiting requests and KV usage (0..1) from Prometheus text, summed over labels."""
    values = metric_sums(text, "vllm:")
    usage = next((values[n] for n in KV_USAGE if n in values), 0.0)
    return common_pb2.Load(
        running_requests=max(0, int(values.get(RUNNING, 0.0))),
        waiting_requests=max(0, int(values.get(WAITING, 0.0))),
        kv_usage=min(max(usage, 0.0), 1.0),
    )


def read_load(base_url: str, timeout: float) -> common_pb2.Load:
    return parse_load(_get(f"{base_url}/metrics", timeout).decode("utf-8", "replace"))
