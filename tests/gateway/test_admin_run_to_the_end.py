"""``admin_common.run_to_the_end`` logs the end of an admin write whose client left also when
the write ended between the client leaving (the runner cancelling the handler) and the handler
seeing that cancellation: its answer was never sent, so the log line is the only trace of how
it ended.

Before: that order (the write's last step and the handler's cancellation in the same turn of
the loop, as when a paused replica resumes right after the client's timeout) logged nothing at
all, and ``test_admin_delete_held`` failed about 1 run in 2 waiting for the line. The order is
made here deterministically with the loop's own FIFO of ready callbacks, no timing."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web

from loragate.gateway.admin_common import run_to_the_end


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_write_that_ends_as_its_client_leaves_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.gateway.admin")
    started, last_step = asyncio.Event(), asyncio.Event()

    async def write() -> web.Response:
        started.set()
        await last_step.wait()
        return web.Response(status=200)

    keep: set[asyncio.Task[Any]] = set()
    handler = asyncio.create_task(
        run_to_the_end(write(), keep=keep, req_id="r-1", what="the deletion of adapter 'x'")
    )
    await started.wait()  # the handler has started the write and waits for it
    (task,) = keep
    last_step.set()  # the write's last step is ready to run ...
    handler.cancel()  # ... and, right after, the client goes away
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert task.done() and not task.cancelled()
    assert (await task).status == 200
    for _ in range(3):  # the done callbacks run at the loop's next turns
        await asyncio.sleep(0)
    assert _logged(
        caplog, "admin: request r-1: the deletion of adapter 'x' ended, its client gone: 200"
    )
    assert not keep


async def test_a_write_still_running_when_its_client_leaves_is_logged_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.gateway.admin")
    started, last_step = asyncio.Event(), asyncio.Event()

    async def write() -> web.Response:
        started.set()
        await last_step.wait()
        return web.Response(status=201)

    keep: set[asyncio.Task[Any]] = set()
    handler = asyncio.create_task(
        run_to_the_end(write(), keep=keep, req_id="r-2", what="the registration of adapter 'y'")
    )
    await started.wait()
    (task,) = keep
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert _logged(caplog, "the client left before the answer; the registration of adapter 'y'")
    assert not task.done()
    last_step.set()
    assert (await task).status == 201
    for _ in range(3):
        await asyncio.sleep(0)
    assert _logged(caplog, "the registration of adapter 'y' ended, its client gone: 201")
