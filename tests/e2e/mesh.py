"""Helpers for the end-to-end tests: read the `kvmesh up` ready line, list members, check pids."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc


def ready_fields(proc: KvmeshProcess) -> dict[str, str]:
    for line in proc.lines:
        if line.startswith("KVMESH_READY service=mesh"):
            return dict(part.split("=", 1) for part in line.split()[1:])
    raise AssertionError(f"no ready line:\n{proc.output[-3000:]}")


def member_roles(metadata: str) -> Counter[str]:
    async def go() -> Counter[str]:
        async with open_channel(metadata) as channel:
            resp = await metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)
        return Counter(common_pb2.Role.Name(m.role) for m in resp.members)

    return asyncio.run(go())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once reaped, so look closer.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
