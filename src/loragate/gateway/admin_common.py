"""What the admin API's endpoint modules share: their logger, a JSON answer and the 503 for a
write while the shared state store is unreachable (see ``gateway.admin``). Their log lines
about a request name its id (``admin: request <id>: ...``: the ``X-Request-Id`` of its
answer, ``gateway.request_ids``)."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

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
