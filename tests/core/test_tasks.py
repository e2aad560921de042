"""cancel_and_wait: stop a background task, keep the caller's own cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from loragate.core.tasks import cancel_and_wait


async def _forever() -> None:
    await asyncio.Event().wait()


async def _slow_to_stop(stopping: asyncio.Event, release: asyncio.Event) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        stopping.set()
        await release.wait()  # cleanup that takes a while


async def test_the_task_is_cancelled_and_the_caller_goes_on() -> None:
    task = asyncio.create_task(_forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_finished_task_is_fine() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await cancel_and_wait(task)
    assert task.done() and not task.cancelled()


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    stopping, release = asyncio.Event(), asyncio.Event()
    background = asyncio.create_task(_slow_to_stop(stopping, release))
    await asyncio.sleep(0)
    after_wait: list[str] = []

    async def shutdown() -> None:
        await cancel_and_wait(background)
        after_wait.append("went on")  # what a swallowed Ctrl-C would do

    caller = asyncio.create_task(shutdown())
    await stopping.wait()  # the caller now waits for the background task's cleanup
    caller.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert after_wait == []
    with contextlib.suppress(asyncio.CancelledError):
        await background


async def test_an_error_of_the_task_propagates() -> None:
    async def failing() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)


async def test_cleanup_in_a_cancelled_caller_goes_on() -> None:
    """A ``finally`` of a task that is being cancelled stops its helpers and closes the rest."""
    background = asyncio.create_task(_forever())
    closed: list[str] = []

    async def serve() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await cancel_and_wait(background)
            closed.append("session")  # what the cleanup after the stop does

    caller = asyncio.create_task(serve())
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert closed == ["session"]
    assert background.cancelled()
