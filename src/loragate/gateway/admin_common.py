"""What the admin API's endpoint modules share: their logger, a JSON answer and the 503 for a
write while the shared state store is unreachable (see ``gateway.admin``). Their log lines
about a request name its id (``admin: request <id>: ...``: the ``X-Request-Id`` of its
answer, ``gateway.request_ids``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from loragate.core.errors import LoragateError
from loragate.gateway.errors import error_payload
from loragate.gateway.request_ids import REQUEST_ID

# One logger for every admin module: its log lines keep the name they always had.
log = logging.getLogger("loragate.gateway.admin")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data).encode(), content_type="application/json"
    )


def state_unavailable(
    request: web.Request, what: str, *, during: bool = False, check: str = "GET /admin/adapters"
) -> web.Response:
    """503 for an admin write (``request``) while the shared state store (Redis) is
    unreachable: the registry is shared, and a write this instance made alone would be decided
    later against other instances' writes (a deletion could come back, a name be taken
    twice)."""
    if during:
        message = (
            f"cannot {what} now: the shared state store (Redis) became unreachable during the "
            "write, which is applied when it is reachable again unless it conflicts with "
            f"another instance's; check {check} then"
        )
    else:
        message = (
            f"cannot {what} now: the shared state store (Redis) is unreachable; "
            "retry when /health says ok"
        )
    log.warning("admin: request %s: %s", request[REQUEST_ID], message)
    return web.Response(
        status=503,
        body=error_payload(message, "service_unavailable", "state_unavailable"),
        content_type="application/json",
    )


async def run_to_the_end(
    op: Coroutine[Any, Any, web.Response], *, keep: set[asyncio.Task[Any]], req_id: str, what: str
) -> web.Response:
    """Run an admin write (``op``: its store writes, replica loads and their undoing on
    failure) as a task that a client going away does not cancel: the runner cancels a handler
    whose client left (``handler_cancellation``), which, inside ``op``, would stop a ``PUT``
    before it puts the old definition back or a ``POST`` before it takes a refused
    registration back. ``keep`` holds the task until it ends (the loop keeps only a weak
    reference); a client that left is logged, and so is the end of its write, also when the
    write ended between the client leaving and the handler seeing its cancellation (its answer
    was never sent either)."""
    task = asyncio.create_task(op, name=f"admin request {req_id}: {what}")
    keep.add(task)
    task.add_done_callback(keep.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            log.warning(
                "admin: request %s: the client left before the answer; %s goes on to its end",
                req_id, what,
            )  # fmt: skip
        # On a task already done the callback runs at the loop's next turn.
        task.add_done_callback(lambda t: _ended_unseen(t, req_id, what))
        raise


def _ended_unseen(task: asyncio.Task[web.Response], req_id: str, what: str) -> None:
    """The end of an admin write whose client had left (``run_to_the_end``): logged."""
    if task.cancelled():
        log.warning("admin: request %s: %s was cancelled (the gateway stopped)", req_id, what)
        return
    exc = task.exception()
    if isinstance(exc, LoragateError):
        log.warning(
            "admin: request %s: %s ended, its client gone: %s: %s",
            req_id, what, type(exc).__name__, exc,
        )  # fmt: skip
    elif exc is not None:
        log.error(
            "admin: request %s: %s failed, its client gone", req_id, what,
            exc_info=(type(exc), exc, exc.__traceback__),
        )  # fmt: skip
    else:
        log.info(
            "admin: request %s: %s ended, its client gone: %d", req_id, what, task.result().status
        )
