"""The gateway's answers to a request no handler takes, in the OpenAI error shape rather than
aiohttp's plain-text pages: an unknown path (404) or a method the path does not take (405,
with ``Allow``). Used by the app's fallback route and by handlers whose path pattern also
matches another endpoint's path (``GET /admin/replicas/R/drain``)."""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import hdrs, web

from loragate.gateway.errors import error_payload


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
