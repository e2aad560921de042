"""Fields of a log record beyond its message, set by the log call (``extra=``), which the JSON
log format (``gateway.log_format``) writes as keys of their own.

A line about a request whose format does not carry the id as a ``request %s`` argument (its
text names the request otherwise, or not at all: an adapter load's refusal names the load's
own ``X-Request-Id``) passes the id here, so that a log pipeline selects every line of a
request by its ``request_id`` field. Text logs are unchanged by it.
"""

from __future__ import annotations

REQUEST_ID = "request_id"


def about_request(request_id: str | None) -> dict[str, object] | None:
    """``extra=`` of a log call about the request ``request_id`` (None: about no request)."""
    return None if request_id is None else {REQUEST_ID: request_id}
