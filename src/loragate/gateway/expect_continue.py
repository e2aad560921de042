"""``Expect: 100-continue`` on the routes that take a body: a request the handler refuses
before reading its body (no or a wrong API key: 401; a ``Content-Length`` over the limit: 413;
a ``Content-Encoding`` it does not read: 415) is answered with that refusal instead of
``100 Continue``, so that the client does not send a body only to have it refused; the others
get ``100 Continue`` (as aiohttp's default handler).

aiohttp calls a route's expect handler before the route's handler, and answers with the
response it returns, if any, without calling the handler. Here the refusal is the handler's
own (counted, logged, with its ``X-Request-Id``: it refuses without reading the body), marked
``Connection: close``: the client sent no body, and a body it sent anyway would otherwise be
read as the next request. An ``Expect`` other than ``100-continue`` gets a 417 in the OpenAI
error shape (aiohttp's: plain text).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from loragate.gateway.errors import error_payload
from loragate.gateway.request_ids import REQUEST_ID_HEADER, RequestIds

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def expect_handler(
    handler: Handler, refused: Callable[[web.Request], bool], ids: RequestIds
) -> ExpectHandler:
    """The expect handler of ``handler``'s route: ``refused(request)`` says whether the
    handler refuses the request before reading its body (then the handler answers it)."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None  # (HTTP/1.0 has no 100 Continue; aiohttp ignores Expect there too)
        expect = request.headers.get(hdrs.EXPECT, "")
        if expect.lower() != "100-continue":
            failed = web.Response(
                status=417,
                body=error_payload(
                    f"unsupported Expect: {expect[:100]!r} (only 100-continue is)",
                    "invalid_request_error",
                    "expectation_failed",
                ),
                content_type="application/json",
                headers={REQUEST_ID_HEADER: ids.of(request.headers.get(REQUEST_ID_HEADER))[0]},
            )
            failed.force_close()
            return failed
        if refused(request):
            response = await handler(request)
            if not response.prepared:
                response.force_close()
            return response
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # (as aiohttp: the answer proper has not started)
        return None

    return expect
