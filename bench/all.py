"""Runs every kvmesh benchmark one after another (`make bench`), each in its own process.

Each benchmark prints its own figures next to its targets; this only sequences them, so one
benchmark's servers and memory never skew the next. `--quick` is passed through.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = ("membership", "cachenode", "router", "fastpath", "trace", "soak")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    chosen = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in chosen:
        print(f"\n=== bench.{name} ===", flush=True)
        started = time.monotonic()
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"=== bench.{name}: {time.monotonic() - started:.0f} s ===", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
