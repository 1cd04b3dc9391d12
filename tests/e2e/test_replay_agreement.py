"""A short replay through real processes agrees with the in-process replay of the same requests.

The in-process replay (RouterCore + simulated engines + pool model on a virtual clock) is
what produces the full-trace figures; this checks it against the real thing: `kvmesh bench
trace --live` starting metadata, cache nodes, router and engine simulators as processes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmesh.services.enginesim.timing import TimingModel
from kvmesh.tools.processes import kvmesh_env
from kvmesh.tools.replay.core_router import CoreRouter
from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process
from kvmesh.tools.workload.generator import WorkloadSpec, generate_workload

pytestmark = pytest.mark.integration

CONVERSATIONS = 20
STORAGE_BACKENDS = 2
CAPACITY = 40


def _live_summary(pool_blocks: int, cachenodes: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "kvmesh", "bench", "trace", "builtin", "--live", "--quiet",
           "--conversations", str(CONVERSATIONS), "--engines", str(STORAGE_BACKENDS), "--cachenodes", str(cachenodes),
           "--capacity-blocks", str(CAPACITY), "--pool-blocks", str(pool_blocks), "--speedup", "20",
           # the in-process side's TimingModel default, so both simulate the same transfer rate
           "--pool-gbps", str(TimingModel().pool_gbps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=kvmesh_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("KVMESH_BENCH_SUMMARY "))
    # The live run comes first; a pool run is followed by its in-process twin at a NIC's rate.
    summary: dict[str, float] = json.loads(line.split(" ", 1)[1])[0]
    return summary


def _in_process_summary(pool_blocks: int) -> dict[str, float]:
    requests = generate_workload(WorkloadSpec(conversations=CONVERSATIONS, seed=0))
    config = ReplayConfig(engines=STORAGE_BACKENDS, capacity_blocks=CAPACITY, pool_blocks=pool_blocks)
    return replay_in_process(requests, CoreRouter("prefix"), "prefix", config).summary()  # type: ignore[return-value]


def _agree(live: dict[str, float], sim: dict[str, float]) -> None:
    assert live["requests"] == sim["requests"]
    assert live["prompt_blocks"] == sim["prompt_blocks"]
    for key in ("local_hit_rate", "pool_hit_rate", "total_hit_rate"):
        assert abs(live[key] - sim[key]) <= 0.08, (key, live[key], sim[key])
    # Simulated latencies come from the same timing model, but near saturation a few ms of
    # wall-clock jitter reorder the queue, so only the order of magnitude must agree.
    assert 0.25 < live["ttft_p50_ms"] / sim["ttft_p50_ms"] < 4.0


def test_live_replay_without_pool_matches_in_process() -> None:
    live = _live_summary(pool_blocks=0, cachenodes=0)
    sim = _in_process_summary(pool_blocks=0)
    assert sim["total_hit_rate"] > 0.3  # the workload reuses prefixes, so the comparison means something
    _agree(live, sim)


def test_live_replay_with_cache_pool_matches_in_process() -> None:
    live = _live_summary(pool_blocks=300, cachenodes=2)
    sim = _in_process_summary(pool_blocks=300)
    assert sim["pool_hit_rate"] > 0.03  # the pool serves blocks the engines evicted
    assert live["pool_hit_rate"] > 0.03  # real bytes came back from the real cache nodes
    _agree(live, sim)
