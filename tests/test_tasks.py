"""cancel_and_wait: absorbs the tasks' own cancellation, never the caller's."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kvmesh.tasks import cancel_and_wait


async def test_cancels_and_waits_for_every_task() -> None:
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(name)

    tasks = [asyncio.create_task(worker(n)) for n in ("a", "b")]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[0], None, tasks[1])
    assert sorted(cleaned) == ["a", "b"] and all(t.cancelled() for t in tasks)


async def test_a_failure_of_the_task_propagates() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await cancel_and_wait(task)


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    async def stubborn() -> None:
        while True:  # takes a while to stop after it is cancelled
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)
                raise

    child = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    after_wait: list[str] = []

    async def closer() -> None:
        await cancel_and_wait(child)
        after_wait.append("went on")  # must not run: the closer itself was cancelled

    outer = asyncio.create_task(closer())
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert after_wait == []
    await asyncio.sleep(0.3)
    assert child.done()


async def test_a_cancel_the_task_lost_is_repeated() -> None:
    # CPython 3.11's asyncio.wait_for returns the inner result when a cancel lands just as
    # the inner future completes (redis-py sends every command through it); the task then
    # runs on as if never cancelled. `deaf` loses its first cancel the same way.
    async def deaf() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    async with asyncio.timeout(2):
        await cancel_and_wait(task, repeat_after=0.05)
    assert task.cancelled()


async def test_a_loop_around_wait_for_is_stopped_wherever_the_cancel_lands() -> None:
    async def write() -> None:
        await asyncio.sleep(0)

    async def sender() -> None:
        while True:
            await asyncio.wait_for(write(), 5)

    for turns in range(12):
        task = asyncio.create_task(sender())
        for _ in range(turns):
            await asyncio.sleep(0)
        async with asyncio.timeout(2):
            await cancel_and_wait(task, repeat_after=0.05)
        assert task.done()
