"""Stopping background tasks without swallowing a cancellation meant for the caller."""

from __future__ import annotations

import asyncio
from typing import Any

REPEAT_CANCEL_AFTER_S = 0.5
RECANCEL_TURNS = 8


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None, repeat_after: float = REPEAT_CANCEL_AFTER_S) -> None:
    """Cancels the given tasks (None entries are skipped) and waits until each has finished.

    The tasks' own CancelledError is expected and absorbed; when the caller itself is being
    cancelled while it waits, that CancelledError is raised, so a shutdown path never
    swallows an outer cancel. The first other exception a task ended with propagates.

    A cancel can get lost inside a task: CPython 3.11's `asyncio.wait_for` returns the inner
    result instead of raising when the cancel lands just as the inner future completes, and
    redis-py sends every command through it. Such a task runs on as if never cancelled (a
    loop like a store's sweeper would run forever), so a task still running `repeat_after`
    seconds after its cancel is cancelled again, once on each of `RECANCEL_TURNS` loop turns
    in a row, until it ends. One cancel per turn lands in every phase of a short loop like
    that, where cancels spaced by a timer can keep landing in the same losing phase.
    """
    pending = list(dict.fromkeys(t for t in tasks if t is not None))
    for task in pending:
        task.cancel()
    running = set(pending)
    while running:
        _, running = await asyncio.wait(running, timeout=repeat_after)
        for _ in range(RECANCEL_TURNS):
            if not running:
                break
            for task in running:
                task.cancel()
            await asyncio.sleep(0)
            running = {task for task in running if not task.done()}
    for task in pending:
        if not task.cancelled():
            task.result()  # re-raises what the task failed with
