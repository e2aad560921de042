"""Stopping a background task without losing the caller's own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished.

    The task's own cancellation is expected and absorbed; its other exceptions propagate. A
    cancellation of the *caller* delivered while it waits (a Ctrl-C landing during a shutdown)
    propagates too, where ``contextlib.suppress(asyncio.CancelledError)`` around ``await task``
    would swallow it and leave the caller running as if nothing had happened. A caller that is
    already unwinding from its own cancellation (cleanup in a ``finally``) still waits for the
    task and goes on with its cleanup: ``asyncio.wait`` raises only for a new cancellation.
    """
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        exc = task.exception()
        if exc is not None:
            raise exc
