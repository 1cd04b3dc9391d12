"""The real vLLM-on-CPU harness every integration test builds on: it starts, answers greedily and
deterministically, and counts prefix-cache hits on a repeated prompt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.tools.testing.vllm import VllmServer, start_vllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = start_vllm(Path(tmp_path_factory.mktemp("vllm")))
    try:
        yield server
    finally:
        server.stop()


def test_greedy_output_is_deterministic_and_prefix_cache_hits(vllm: VllmServer) -> None:
    prompt = list(range(100, 100 + 96))  # three 32-token blocks
    first = vllm.complete(prompt, max_tokens=6)
    hits_before = vllm.metrics().get("vllm:prefix_cache_hits_total", 0.0)
    second = vllm.complete(prompt, max_tokens=6)
    hits_after = vllm.metrics().get("vllm:prefix_cache_hits_total", 0.0)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["usage"]["prompt_tokens"] == 96
    assert hits_after - hits_before >= 64, (hits_before, hits_after)
