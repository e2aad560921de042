"""The gateway's answers to a request no handler takes, in the OpenAI error shape rather than
aiohttp's plain-text pages: an unknown path (404) or a method the path does not take (405,
with ``Allow``). Used by the app's fallback route and by handlers whose path pattern also
matches another endpoint's path (``GET /admin/replicas/R/drain``).

And the log of the requests no replica could take (:class:`NoReplicaLog`): the proxy's 503
``no_replica_available`` (every replica unhealthy or drained) is logged as one WARNING at most
every ``log_interval_s`` (60 s), naming the request, the error and each replica's state (its
last error), and how many more came meanwhile, so that an outage leaves a trace in the log
without flooding it (each request is also in the DEBUG access log and counted in
``loragate_requests_total{status="503"}``)."""

from __future__ import annotations

import logging
from collections.abc import Collection

from aiohttp import hdrs, web

from loragate.backends.pool import ReplicaPool
from loragate.core.clock import Clock
from loragate.core.log_fields import about_request
from loragate.gateway.errors import error_payload
from loragate.gateway.log_rate import LineRate

log = logging.getLogger(__name__)

_MAX_ERROR_LOGGED = 200  # a replica's last error is cut here in the line


def _where(request: web.Request) -> str:
    return f"{request.method} {request.path[:200]}"


def method_not_allowed(request: web.Request, allowed: Collection[str]) -> web.Response:
    """405 naming the methods the path takes (also in ``Allow``)."""
    methods = sorted(allowed)
    return web.Response(
        status=405,
        body=error_payload(
            f"method not allowed: {_where(request)} (allowed: {', '.join(methods)})",
            "invalid_request_error",
            "method_not_allowed",
        ),
        content_type="application/json",
        headers={hdrs.ALLOW: ",".join(methods)},
    )


def not_found(request: web.Request) -> web.Response:
    """404: no endpoint at this path."""
    return web.Response(
        status=404,
        body=error_payload(
            f"no such endpoint: {_where(request)}", "invalid_request_error", "not_found"
        ),
        content_type="application/json",
    )


class NoReplicaLog:
    """Logs the requests answered 503 ``no_replica_available``: one WARNING at most every
    ``log_interval_s``, with how many more came since the last one."""

    def __init__(self, pool: ReplicaPool, clock: Clock, log_interval_s: float = 60.0) -> None:
        self._pool = pool
        self._line = LineRate(clock, log_interval_s)

    def refused(
        self, path: str, adapter: str | None, reason: str, request_id: str | None = None
    ) -> None:
        """A request for ``adapter`` (None: the base model) on ``path`` was answered 503
        because no replica could take it (``reason``: the error's message); ``request_id``:
        its id (the line's, when it gets one)."""
        more = self._line.due()
        if more is None:
            return
        log.warning(
            "no replica available: POST %s for model %s answered 503 no_replica_available (%s); "
            "replicas: %s%s; at most one such line per %g s; "
            'loragate_requests_total{status="503"} counts them all',
            path, adapter or "<base>", reason, self._replica_states(),
            f"; {more} more since the last such line" if more else "",
            self._line.interval_s, extra=about_request(request_id),
        )  # fmt: skip

    def _replica_states(self) -> str:
        pool = self._pool
        states = []
        for rid in pool.replica_ids:
            healthy = pool.is_healthy(rid)
            state = "healthy" if healthy else "unhealthy"
            if pool.is_draining(rid):
                state = "draining" if healthy else "draining+unhealthy"
            error = pool.last_error(rid)
            if error and not healthy:
                state += f" ({error[:_MAX_ERROR_LOGGED]})"
            states.append(f"{rid}={state}")
        return ", ".join(states) or "none"
