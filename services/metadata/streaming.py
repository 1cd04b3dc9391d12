"""Error mapping for streaming handlers (unary handlers use `kvmesh.runtime.errors.guard`)."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from kvmesh.runtime.errors import KvmeshError, status_for

log = logging.getLogger("kvmesh.metadata")


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Ends the stream with the status `exc` maps to (INTERNAL, logged, for a bug)."""
    if not isinstance(exc, KvmeshError | ValueError):
        log.error("stream handler failed", exc_info=exc)
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises
