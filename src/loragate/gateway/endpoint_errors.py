"""Error answers of the gateway's own endpoints (the admin API, ``GET /v1/models``,
``/metrics``, unknown paths and wrong methods), which no proxied request's accounting sees:
each is counted in ``loragate_endpoint_errors_total{endpoint,status}`` by endpoint class, never
the raw path. A failed authentication (401: a missing or wrong bearer token) is also logged,
as one WARNING at most every ``log_interval_s`` (60 s) saying how many more came meanwhile,
so that token guessing shows in the log without flooding it; the token sent is never logged.
Other errors are logged at DEBUG. Each line names the request's id (``gateway.request_ids``:
the ``X-Request-Id`` of its answer). The proxy's failed authentications (a missing or wrong tenant
key on ``POST /v1/completions`` and ``/v1/chat/completions``, counted in
``loragate_requests_total``) are logged the same way, in the same lines
(:meth:`EndpointErrors.auth_failed`)."""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from loragate.core.clock import Clock
from loragate.gateway.log_rate import LineRate
from loragate.gateway.request_ids import REQUEST_ID
from loragate.gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

_MAX_PATH_LOGGED = 200


def _where(request: web.Request) -> str:
    return f"{request.method} {request.raw_path[:_MAX_PATH_LOGGED]}"  # as sent: escaped


def endpoint_class(path: str) -> str:
    """The label ``loragate_endpoint_errors_total`` gives ``path`` (``telemetry.
    ENDPOINT_CLASSES``)."""
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path == "/v1/models":
        return "models"
    if path == "/metrics":
        return "metrics"
    if path in ("/health", "/livez", "/readyz"):  # the probes
        return "health"
    if path.startswith("/v1/"):
        return "api"
    return "other"


class EndpointErrors:
    """Counts (and logs) the error answers the gateway's own handlers give."""

    def __init__(self, telemetry: Telemetry, clock: Clock, log_interval_s: float = 60.0) -> None:
        self._telemetry = telemetry
        self._line = LineRate(clock, log_interval_s)

    def answered(self, request: web.Request, response: web.Response) -> web.Response:
        """``response``, counted first if it is an error answer (status >= 400)."""
        status = response.status
        if status < 400:
            return response
        endpoint = endpoint_class(request.path)
        self._telemetry.count_endpoint_error(endpoint, status)
        if status == 401:
            self.auth_failed(request)
        else:
            log.debug(
                "request %s %s from %s: %d (%s)",
                request.get(REQUEST_ID, "-"), _where(request), request.remote, status, endpoint,
            )  # fmt: skip
        return response

    def auth_failed(self, request: web.Request, request_id: str | None = None) -> None:
        """Log that ``request`` failed authentication (rate-limited; not counted here: a
        proxied request is counted in ``loragate_requests_total``, an own endpoint's in
        :meth:`answered`). ``request_id``: its id (default: the one its handler's wrapper
        gave it)."""
        more = self._line.due()
        if more is None:
            return
        sent = "without an" if hdrs.AUTHORIZATION not in request.headers else "with a wrong"
        log.warning(
            "authentication failed: %s from %s %s Authorization header (401, request %s)%s; at "
            "most one such line per %g s; loragate_endpoint_errors_total (admin API, "
            "/v1/models, /metrics) and loragate_requests_total (completions) count them all, "
            "status 401",
            _where(request), request.remote, sent,
            request.get(REQUEST_ID, "-") if request_id is None else request_id,
            f"; {more} more since the last such line" if more else "",
            self._line.interval_s,
        )  # fmt: skip
