"""OpenAI-shaped errors for requests that fail before any handler runs.

aiohttp answers a request its HTTP parser rejects (a request line or header over its limits,
a malformed request line, an invalid method, bad ``Transfer-Encoding`` or chunked framing)
itself, from ``aiohttp.web_protocol.RequestHandler.handle_error``, with a plain-text body (a
``Content-Encoding`` it knows but cannot decode without an optional package, ``br`` or
``zstd``, is such an error too: answered 415 here, as ``request_body`` answers the others); it
also uses that method for the 500/504 of a handler that raised. ``OpenAIErrorAppRunner`` is a
``web.AppRunner`` whose connections answer those with ``{"error": {"message", "type",
"param", "code"}}`` (application/json), keeping aiohttp's status and its ``Connection: close``,
with an ``X-Request-Id`` as every answer of the gateway (``gateway.request_ids``: the one the
handler's wrapper gave the request, else the client's if safe, else generated), which the log
line names (a WARNING at most once a minute, saying how many more came; the others at DEBUG).

The aiohttp internals used (checked against aiohttp 3.14) are all in the three small classes
at the end of this module: ``OpenAIErrorAppRunner._make_server`` (the hook ``web.BaseRunner``
declares for subclasses) lets ``web.AppRunner`` build its ``web.Server`` as usual (app startup,
handler kwargs) and then changes that object's class to ``_OpenAIErrorServer``, whose protocol
factory (``__call__``) lets aiohttp build each connection's ``web.RequestHandler`` and changes
its class to one that overrides ``handle_error``. The handler subclass adds no instance state
(``__slots__ = ()``, as its base uses slots; the runner's ``on_error`` callback, which counts
the errors in ``/metrics``, and its request-id generator are class attributes of a subclass
made per runner), so Python
accepts the class change
or raises ``TypeError`` on the first connection if aiohttp's layout ever changes (the tests in
tests/gateway/test_protocol_errors.py would fail), and aiohttp's own construction logic is kept
rather than copied. The same handler class keeps the request-head deadline
(``gateway.head_deadline``: ``connection_made``, ``data_received`` and ``connection_lost``
start and stop it). Nothing else (limits, keep-alive, parser) is changed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, ClassVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    ContentEncodingError,
    LineTooLong,
    TransferEncodingError,
)

from loragate.core.clock import WallClock
from loragate.gateway.errors import (
    ACCEPT_ENCODING,
    error_payload,
    unsupported_encoding_message,
)
from loragate.gateway.head_deadline import HeadDeadlines
from loragate.gateway.log_rate import LineRate
from loragate.gateway.request_body import unreadable_body_request_id
from loragate.gateway.request_ids import REQUEST_ID_HEADER, RequestIds, request_id_of

log = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 200
# The encoding aiohttp names in "Can not decode content-encoding: brotli (br). Please ...".
_ENCODING_NAMED = re.compile(r"content-encoding: \S+ \((\S+)\)")
# A trailing echo of the offending bytes, as aiohttp's messages end with one (a repr() of
# bytes or str): ": b'...'", ": bytearray(b'...')", " '...'", ": '...'." (a quoted word inside
# the message, "Missing 'Host' header in request.", is no echo: kept).
_BYTES_ECHO = re.compile(r"""(?::\s*|\s+)(?:bytearray\()?b?(['"]).*\1\)?\.?$""")


def describe_protocol_error(exc: BaseException | None, message: str | None) -> str:
    """What was wrong, for the client: aiohttp's message without the echoed bytes, the caret
    line and the multi-line layout (e.g. ``"Bad status line: Expected CRLF after version"``);
    ``""`` when nothing is left."""
    if isinstance(exc, LineTooLong) and len(exc.args) >= 2:
        return f"request line or header field longer than {exc.args[1]} bytes"
    if isinstance(exc, TransferEncodingError):
        # aiohttp's pure-Python parser may put just the offending bytes in the message.
        return "invalid chunked Transfer-Encoding framing of the body"
    parts: list[str] = []
    for line in (message or "").splitlines():
        text = line.strip()
        if not text or set(text) <= {"^", " "} or text.startswith(("b'", 'b"', "bytearray(")):
            continue
        text = _BYTES_ECHO.sub("", text).rstrip(" :.")
        if text:
            parts.append(text)
    return ": ".join(parts)[:_MAX_MESSAGE_CHARS]


def _code(status: int) -> str:
    if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        return "request_too_large"
    if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
        return "request_header_fields_too_large"
    if status == HTTPStatus.GATEWAY_TIMEOUT:
        return "gateway_timeout"
    if status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE:
        return "unsupported_content_encoding"
    return "invalid_http_request" if status < 500 else "internal_error"


class _OpenAIErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol with an OpenAI-shaped ``handle_error``."""

    __slots__ = ()
    # Called with the status of every error answered here; set per runner (see below).
    error_listeners: ClassVar[tuple[Callable[[int], None], ...]] = ()
    # The app's request-id generator; set per runner (see below).
    request_ids: ClassVar[RequestIds] = RequestIds()
    # At most one WARNING a minute for rejected requests; set per runner (see below).
    warning_line: ClassVar[LineRate] = LineRate(WallClock())
    # The connections that owe a request head (``gateway.head_deadline``); set per runner.
    head_deadlines: ClassVar[HeadDeadlines | None] = None

    # -- the request-head deadline (aiohttp 3.14: ``_request_count`` counts the heads parsed,
    # ``_waiter`` is pending while the connection waits for one) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if (deadlines := self.head_deadlines) is not None:
            deadlines.start(self, self.peername)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if (deadlines := self.head_deadlines) is None:
            return
        if self._request_count != heads:
            deadlines.stop(self)
        elif data and (waiter := self._waiter) is not None and not waiter.done():
            deadlines.start(self, self.peername)  # the first bytes of a head

    def connection_lost(self, exc: BaseException | None) -> None:
        if (deadlines := self.head_deadlines) is not None:
            deadlines.stop(self)
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp drains the unread rest of a body after the answer (``start``) and logs an
        # "Unhandled exception" (ERROR, the chained tracebacks) if the body had failed: a
        # Content-Encoding that does not decode, bad framing. The handler read that error
        # already and answered it (400, ``request_body``): say so at DEBUG, naming the request.
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            log.debug(
                "request %s from %s: its body could not be read (%s); answered, the "
                "connection is closed",
                unreadable_body_request_id(exc) or "-",
                self.peername,
                " ".join(str(exc).split()),
            )
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        request_id = request_id_of(request, self.request_ids)
        headers = {REQUEST_ID_HEADER: request_id}
        if isinstance(exc, ContentEncodingError) and status == HTTPStatus.BAD_REQUEST:
            # A Content-Encoding aiohttp knows but cannot decode here (br, zstd: optional
            # packages), refused with the head: as request_body refuses the others.
            status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
        if status < 500:
            if status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE:
                found = _ENCODING_NAMED.search(message or "")
                text = unsupported_encoding_message(found[1] if found else "?")
                headers[hdrs.ACCEPT_ENCODING] = ACCEPT_ENCODING
            else:
                detail = describe_protocol_error(exc, message)
                text = f"malformed HTTP request: {detail}" if detail else "malformed HTTP request"
            # A bad method is mostly TLS or other non-HTTP traffic sent to the port (scanners,
            # a client configured with https): like aiohttp, keep that out of WARNING. The
            # other rejections come in floods too (a broken or hostile client): one WARNING
            # per minute at most, the rest at DEBUG (all counted in /metrics).
            more = None if isinstance(exc, BadHttpMethod) else self.warning_line.due()
            log.log(
                logging.DEBUG if more is None else logging.WARNING,
                "rejected request %s from %s with %d: %s (%s)%s",
                request_id,
                request.remote,
                status,
                text,
                type(exc).__name__ if exc is not None else "no exception",
                ""
                if more is None
                else (
                    f"{f'; {more} more since the last such line' if more else ''}; at most "
                    f"one such line per {self.warning_line.interval_s:g} s, the others at "
                    "DEBUG; loragate_http_errors_total counts them all"
                ),
            )
            err_type = "invalid_request_error"
        else:
            # The server log keeps the traceback of a handler that raised; the client never
            # gets it (aiohttp would send it in debug mode).
            log.error(
                "error handling request %s from %s (%d)",
                request_id, request.remote, status, exc_info=exc,
            )  # fmt: skip
            text = "internal gateway error"
            if status == HTTPStatus.GATEWAY_TIMEOUT:
                text = "the gateway timed out handling the request"
            err_type = "server_error"
        for listener in self.error_listeners:
            listener(status)
        # As aiohttp: once part of a response went out, no other response can follow.
        if request.writer.output_size > 0:
            raise ConnectionError(
                "Response is sent already, cannot send another response with the error message"
            )
        resp = web.Response(
            status=status,
            body=error_payload(text, err_type, _code(status)),
            content_type="application/json",
            headers=headers,
        )
        resp.force_close()
        return resp


class _OpenAIErrorServer(web.Server):
    """``web.Server`` whose connections use a ``_OpenAIErrorRequestHandler`` class."""

    handler_class: type[_OpenAIErrorRequestHandler] = _OpenAIErrorRequestHandler

    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        handler.__class__ = self.handler_class
        return handler


class OpenAIErrorAppRunner(web.AppRunner):
    """``web.AppRunner`` that answers HTTP protocol errors in the OpenAI error shape.

    ``on_error(status)``, when given, is called once for every such error (the gateway counts
    them in ``/metrics``); ``request_ids`` is the app's request-id generator (default: one of
    the runner's own); ``head_timeout_s()``, when given, is how long a connection may take to
    send a request head (``gateway.head_deadline``; none: aiohttp's keep-alive timeout), and
    ``on_head_timeout()`` is called for every connection closed at that deadline; the other
    arguments are ``web.AppRunner``'s."""

    def __init__(
        self,
        app: web.Application,
        *,
        on_error: Callable[[int], None] | None = None,
        request_ids: RequestIds | None = None,
        head_timeout_s: Callable[[], float] | None = None,
        on_head_timeout: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        deadlines = (
            None if head_timeout_s is None else HeadDeadlines(head_timeout_s, on_head_timeout)
        )
        self._handler_class: type[_OpenAIErrorRequestHandler] = type(
            "_AppOpenAIErrorRequestHandler",
            (_OpenAIErrorRequestHandler,),
            {
                "__slots__": (),
                "error_listeners": () if on_error is None else (on_error,),
                "request_ids": request_ids or RequestIds(),
                "head_deadlines": deadlines,
                "warning_line": LineRate(WallClock()),
            },
        )

    async def _make_server(self) -> web.Server:
        # The one use of aiohttp internals (see the module docstring).
        server = await super()._make_server()
        server.__class__ = _OpenAIErrorServer
        assert isinstance(server, _OpenAIErrorServer)
        server.handler_class = self._handler_class
        return server
