"""Reading a client's request body with a size limit and an idle timeout.

``aiohttp``'s ``request.read()`` waits as long as the client keeps the connection open. Two
kinds of client make that forever: one that stops sending mid-body (a stalled or malicious
client), and one whose chunked framing breaks after the handler has started reading: with
aiohttp's C parser (3.14) the parse error is queued as the *next* request on the connection and
the body being read never ends. Both hold a handler and a connection until the client leaves.
``read_request_body`` gives up after ``idle_timeout_s`` without a byte (as nginx's
``client_body_timeout`` does) and the gateway answers 408; the connection is then closed, as
the unread rest of the body cannot be skipped.
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from loragate.core.errors import (
    ClientBodyTimeoutError,
    PayloadTooLargeError,
    UnreadableBodyError,
    UnsupportedEncodingError,
)
from loragate.gateway.errors import ACCEPTED_ENCODINGS, unsupported_encoding_message
from loragate.gateway.request_ids import REQUEST_ID


async def read_request_body(
    request: web.Request, *, max_bytes: int, idle_timeout_s: float, request_id: str | None = None
) -> bytes:
    """The whole body (decoded, if it had a ``Content-Encoding``).

    Raises ``UnsupportedEncodingError`` before reading if the ``Content-Encoding`` is not one
    of ``ACCEPTED_ENCODINGS`` (aiohttp would read an unknown one, or ``gzip, gzip``, as plain
    bytes, and answer ``br``/``zstd`` with a hint to install a package),
    ``PayloadTooLargeError`` past ``max_bytes``, ``ClientBodyTimeoutError`` after
    ``idle_timeout_s`` without new bytes, and ``UnreadableBodyError`` if the body cannot be
    decoded (bad compression, or framing errors the parser does report); the parser's error
    is then tagged with ``request_id`` (default: ``request[REQUEST_ID]``) for
    :func:`unreadable_body_request_id`."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes, length)
    encoded = hdrs.CONTENT_ENCODING in request.headers
    if encoded:
        _check_encoding(request)
    content = request.content
    if content.is_eof() and not encoded:
        # The whole (plain) body arrived with the head, the usual case: take it at once.
        body = content.read_nowait()
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except TimeoutError as exc:
        raise ClientBodyTimeoutError(
            f"no request body bytes for {idle_timeout_s:g} s after {size} bytes; "
            "the request body was not received in full"
        ) from exc
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding that does not decode
        setattr(
            exc, _REQUEST_ID_ATTR, request.get(REQUEST_ID) if request_id is None else request_id
        )
        raise UnreadableBodyError(f"the request body cannot be read: {_reason(exc)}") from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# aiohttp raises the same exception object again when it drains the rest of the body after
# the answer (``web.RequestHandler.start``), and logs it there without the request: the tag
# lets that log line (``protocol_errors``) name the request.
_REQUEST_ID_ATTR = "loragate_request_id"


def unreadable_body_request_id(exc: BaseException) -> str | None:
    """The id of the request whose body ``read_request_body`` could not read with ``exc``
    (None: not such an error, or no id known)."""
    value = getattr(exc, _REQUEST_ID_ATTR, None)
    return value if isinstance(value, str) else None


def encoding_refused(request: web.Request) -> bool:
    """Whether ``read_request_body`` refuses ``request``'s ``Content-Encoding`` (415) before
    reading its body (``gateway.expect_continue`` answers that instead of ``100 Continue``)."""
    if hdrs.CONTENT_ENCODING not in request.headers:
        return False
    try:
        _check_encoding(request)
    except UnsupportedEncodingError:
        return True
    return False


def _check_encoding(request: web.Request) -> None:
    values = [v.strip().lower() for v in request.headers.getall(hdrs.CONTENT_ENCODING)]
    if not any(values):
        return  # an empty list of codings (RFC 9110 section 5.6.1): none, as aiohttp reads it
    value = values[0] if len(values) == 1 else ", ".join(values)
    if value not in ACCEPTED_ENCODINGS:
        raise UnsupportedEncodingError(unsupported_encoding_message(value))


def _too_large(max_bytes: int, declared: int | None = None) -> PayloadTooLargeError:
    size = "" if declared is None else f" of {declared} bytes"
    return PayloadTooLargeError(f"request body{size} exceeds the limit of {max_bytes} bytes")


# aiohttp's HttpProcessingError text ("400, message:\n  <message>"), passed on as a string.
_STATUS_PREFIX = re.compile(r"^\d{3}, message:\s*")


def _reason(exc: web.RequestPayloadError) -> str:
    """The parser's reason on one line, e.g. ``"Can not decode content-encoding: gzip"``."""
    cause = exc.__cause__
    if isinstance(cause, HttpProcessingError) and cause.message:
        text = cause.message
    else:
        text = _STATUS_PREFIX.sub("", str(exc))
    return " ".join(text.split()) or "the body's framing or encoding is invalid"
