"""Stopping background tasks without swallowing a cancellation meant for the caller."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels the given tasks (None entries are skipped) and waits until each has finished.

    The tasks' own CancelledError is expected and absorbed; when the caller itself is being
    cancelled while it waits, that CancelledError is re-raised, so a shutdown path never
    swallows an outer cancel. Any other exception a task ended with propagates.
    """
    pending = [t for t in tasks if t is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
