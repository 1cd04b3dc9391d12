"""The status a gRPC call ends with, for tests that assert refusals as values."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    """OK when `call` succeeds, else the code of the AioRpcError it raised."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
