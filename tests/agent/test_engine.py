"""What the agent reads from a vLLM server's text: load from Prometheus lines, and its settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvmesh.services.agent.engine import metric_sums, parse_load
from kvmesh.services.agent.settings import AgentSettings

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny-llama"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.25
vllm:prefix_cache_hits_total{engine="0",model_name="tiny-llama"} 64.0
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_load_from_vllm_metrics() -> None:
    load = parse_load(METRICS)
    assert (load.running_requests, load.waiting_requests) == (4, 7)
    assert load.kv_usage == pytest.approx(0.25)


def test_older_and_odd_metrics() -> None:
    assert parse_load("vllm:gpu_cache_usage_perc 0.5\n").kv_usage == pytest.approx(0.5)
    odd = parse_load("vllm:num_requests_running NaN-ish\nvllm:num_requests_waiting -3\nvllm:kv_cache_usage_perc 7\n")
    assert (odd.running_requests, odd.waiting_requests, odd.kv_usage) == (0, 0, 1.0)
    assert parse_load("") == parse_load("garbage without metrics")


def test_settings() -> None:
    s = AgentSettings(engine_url="http://10.0.0.5:8000/", metadata="127.0.0.1:7400")
    assert s.engine_url == "http://10.0.0.5:8000" and s.advertised_engine == "10.0.0.5:8000"
    assert AgentSettings(engine_url="http://h:1", engine_address="pod:9").advertised_engine == "pod:9"
    for bad in ({"engine_url": "10.0.0.5:8000"}, {"engine_url": "http://host"}, {"kv_events": "5557"},
                {"unhealthy_after": 0}):
        with pytest.raises(ValidationError):
            AgentSettings(**bad)


def test_metric_sums_reads_the_value_not_a_timestamp_or_an_exemplar() -> None:
    text = (
        '# HELP vllm:num_requests_running Running.\n'
        'vllm:num_requests_running{model_name="a b}c",engine="0"} 3 1733000000000\n'
        'vllm:num_requests_running{model_name="x\\"}y"} 2\n'
        'vllm:prefix_cache_hits_total{model_name="m"} 7 # {trace_id="q"} 99\n'
        'vllm:request_success_total 5\n'
        'vllm:broken{a="1"}\n'
    )
    sums = metric_sums(text)
    assert sums == {"vllm:num_requests_running": 5.0, "vllm:prefix_cache_hits_total": 7.0,
                    "vllm:request_success_total": 5.0}
    assert parse_load(text).running_requests == 5
