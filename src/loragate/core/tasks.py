"""Stopping a background task without losing the caller's own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished.

    The task's own ``CancelledError`` is expected and absorbed; a cancellation of the *caller*
    that arrives while it waits (Ctrl-C landing during a shutdown, say) is re-raised, where
    ``contextlib.suppress(asyncio.CancelledError)`` around the ``await`` would swallow it and
    leave the caller running as if nothing had happened. Other exceptions of the task propagate.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise
