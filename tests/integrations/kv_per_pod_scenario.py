"""Per-pod KV-event mode with a real vLLM, run inside a private network namespace.

In per-pod mode vLLM binds its publisher (`tcp://*:PORT`), which must never listen on the shared
network; `test_vllm_kv_events_per_pod.py` runs this module under `unshare -rn` (loopback only,
brought up first). It starts metadata, a router (per-pod mode is on by default), vLLM and the
agent announcing `kv-events`/`kv-events-replay`, sends one request, and prints one JSON line
with what the router saw; the test asserts on it.

    python -m tests.integrations.kv_per_pod_scenario WORKDIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc

from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.vllm import BLOCK_SIZE, MODEL_NAME, start_vllm
from kvmesh.v1 import router_pb2, router_pb2_grpc


def main(workdir: Path) -> int:
    events, replay = free_port(), free_port()
    procs: list[KvmeshProcess] = []
    vllm = None
    result: dict[str, object] = {}
    try:
        metadata = KvmeshProcess(["metadata", "--listen", "127.0.0.1:0", "--backend", "memory://?sweep_ms=50"])
        procs.append(metadata)
        metadata.wait_ready(60)
        router = KvmeshProcess(["router", "--listen", "127.0.0.1:0", "--metadata", str(metadata.address),
                                "--no-register-self", "--block-size", str(BLOCK_SIZE), "--policy", "prefix"])
        procs.append(router)
        router.wait_ready(60)
        config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events}",
                  "replay_endpoint": f"tcp://*:{replay}", "topic": "kv"}
        vllm = start_vllm(workdir, "--kv-events-config", json.dumps(config), wait=False)
        vllm.wait_healthy(480)  # minutes on a loaded machine
        agent = KvmeshProcess(["agent", "--engine-url", vllm.url, "--metadata", str(metadata.address),
                               "--member-id", "pod-1", "--kv-events", f"tcp://127.0.0.1:{events}",
                               "--kv-events-replay", f"tcp://127.0.0.1:{replay}", "--poll-interval-seconds", "0.5"])
        procs.append(agent)
        agent.wait_ready(60)
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(str(router.address)))

        def matched(tokens: list[int]) -> int:
            r = stub.Route(router_pb2.RouteRequest(model=MODEL_NAME, tokens=router_pb2.TokenIds(ids=tokens)),
                           timeout=10)
            stub.Release(router_pb2.ReleaseRequest(request_id=r.request_id), timeout=10)
            return int(r.matched_blocks)

        deadline = time.monotonic() + 60
        while stub.Stats(router_pb2.RouterStatsRequest(), timeout=10).members < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the router never saw the pod")
            time.sleep(0.2)
        time.sleep(1.0)  # the router's SUB connects to the pod's publisher
        tokens = list(range(100, 100 + 3 * BLOCK_SIZE))
        result["before"] = matched(tokens)
        vllm.complete(tokens, max_tokens=4)
        deadline = time.monotonic() + 30
        while (got := matched(tokens)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        result["after"] = got
        stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=10)
        result.update(warm=stats.warm, batches=stats.kv_event_batches, blocks=stats.kv_event_blocks)
    except Exception as exc:  # reported to the test, with the logs
        result["error"] = repr(exc)
        result["logs"] = {p.name: p.tail(20) for p in procs}
    finally:
        if vllm is not None:
            vllm.kill()
        for p in reversed(procs):
            p.kill()
            p.close()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
