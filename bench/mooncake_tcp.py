"""Mooncake's transfer engine over its TCP transport, raw (no cache node): a reference for bench.cachenode.

    unshare -n sh -c 'ip link set lo up && python -m bench.mooncake_tcp --sizes 65536,2097152 --batches 1,32'

Two processes inside a private network namespace (Mooncake's TCP transport wants one: it
binds every interface): a target that registers a buffer and waits, and this initiator,
which writes into and reads from it with `batch_transfer_sync_write/read`. Prints one JSON
line: {"size,batch,op": GB/s} (medians of rounds). bench.cachenode runs it and shows the rates.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

import numpy as np

HOST = "127.0.0.1"


def _engine() -> object:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise SystemExit(f"mooncake: initialize failed with code {rc}")
    return engine


def _address(buffer: np.ndarray) -> int:
    return int(buffer.ctypes.data_as(ctypes.c_void_p).value or 0)


def serve(total: int) -> None:
    engine = _engine()
    buffer = np.zeros(total, dtype=np.uint8)
    rc = engine.register_memory(_address(buffer), total)  # type: ignore[attr-defined]
    if rc != 0:
        raise SystemExit(f"mooncake: register_memory failed with code {rc}")
    print(f"READY {HOST}:{engine.get_rpc_port()} {_address(buffer)}", flush=True)  # type: ignore[attr-defined]
    sys.stdin.read()  # until the initiator closes our stdin


def run(sizes: list[int], batches: list[int], rounds: int, bytes_per_round: int) -> dict[str, float]:
    total = max(size * batch for size in sizes for batch in batches)
    target = subprocess.Popen(
        [sys.executable, "-m", "bench.mooncake_tcp", "--serve", str(total)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert target.stdout is not None
        line = target.stdout.readline().split()
        if not line or line[0] != "READY":
            raise SystemExit(f"mooncake target did not start: {line}")
        segment, remote = line[1], int(line[2])
        engine = _engine()
        local = np.ones(total, dtype=np.uint8)
        engine.register_memory(_address(local), total)  # type: ignore[attr-defined]
        base = _address(local)
        out: dict[str, float] = {}
        for size in sizes:
            for batch in batches:
                buffers = [base + i * size for i in range(batch)]
                peers = [remote + i * size for i in range(batch)]
                lengths = [size] * batch
                count = max(2, bytes_per_round // (size * batch))
                for op in ("put", "get"):
                    call = engine.batch_transfer_sync_write if op == "put" else engine.batch_transfer_sync_read  # type: ignore[attr-defined]
                    rates = []
                    for _ in range(rounds):
                        start = time.perf_counter()
                        for _ in range(count):
                            rc = call(segment, buffers, peers, lengths)
                            if rc != 0:
                                raise SystemExit(f"mooncake: transfer failed with code {rc}")
                        rates.append(count * size * batch / (time.perf_counter() - start) / 1e9)
                    out[f"{size},{batch},{op}"] = statistics.median(rates)
        return out
    finally:
        if target.stdin is not None:
            target.stdin.close()
        target.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="65536,2097152,8388608")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes-per-round", type=int, default=64 * 1024**2)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(json.dumps(run(sizes, batches, args.rounds, args.bytes_per_round)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
