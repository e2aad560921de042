"""The one place where loragate errors become HTTP statuses and OpenAI-shaped error bodies:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from aiohttp import web

from loragate.core.errors import (
    AdapterLoadError,
    AdapterLoadTimeoutError,
    AuthenticationError,
    ClientBodyTimeoutError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LoragateError,
    NoReplicaAvailableError,
    NotFoundError,
    PayloadTooLargeError,
    ShuttingDownError,
    UnreadableBodyError,
    UnsupportedEncodingError,
    UpstreamTimeoutError,
)

# The request body encodings the gateway reads (aiohttp decodes gzip and deflate; br and zstd
# only with optional packages): said in a 415's Accept-Encoding (RFC 9110 section 12.5.3).
ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")
ACCEPT_ENCODING = ", ".join(ACCEPTED_ENCODINGS)  # the 415's Accept-Encoding header
# A 503 no_replica_available's Retry-After (seconds): about two of the poller's default
# intervals, after which a replica back in rotation is seen (the OpenAI SDKs wait that long
# before their retry, rather than their own backoff of about 0.5 s).
NO_REPLICA_RETRY_AFTER = "1"


def unsupported_encoding_message(encoding: str) -> str:
    """A 415's message for a body whose ``Content-Encoding`` is ``encoding``."""
    return (
        f"unsupported Content-Encoding {encoding[:100]!r} of the request body; supported: "
        f"{ACCEPT_ENCODING} (one of them, once)"
    )


class VllmRequestError(InvalidRequestError):
    """A request refused as vLLM itself refuses it (``gateway/vllm_validation.py``): status 400
    with vLLM's error type ("Bad Request", "BadRequestError"), its message and param, and
    ``code`` 400 (an integer, as vLLM has it)."""

    def __init__(self, message: str, *, err_type: str, param: str | None) -> None:
        super().__init__(message, param=param)
        self.err_type = err_type


class VllmNotFoundError(NotFoundError):
    """A model vLLM 0.32 would not find, answered as vLLM answers it (404; type
    "NotFoundError", an integer ``code`` 404, ``param: model``; recorded in
    ../shared/design/vllm-0.32/transcript_basic.md and bench/vllm_cpu/tokenize_transcript.md):
    a client written for vLLM reads the same body (the SDKs raise their ``NotFoundError`` for
    the status either way)."""


# (status, OpenAI error type, code), most specific class first.
_MAPPING: tuple[tuple[type[LoragateError], int, str, str], ...] = (
    (InvalidRequestError, 400, "invalid_request_error", "invalid_request"),
    (ConfigError, 400, "invalid_request_error", "invalid_config"),
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (NotFoundError, 404, "invalid_request_error", "model_not_found"),
    (ClientBodyTimeoutError, 408, "invalid_request_error", "request_timeout"),
    (ConflictError, 409, "invalid_request_error", "conflict"),
    (PayloadTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (UnsupportedEncodingError, 415, "invalid_request_error", "unsupported_content_encoding"),
    (NoReplicaAvailableError, 503, "service_unavailable", "no_replica_available"),
    (ShuttingDownError, 503, "service_unavailable", "shutting_down"),
    (UpstreamTimeoutError, 504, "upstream_error", "upstream_timeout"),
    (AdapterLoadError, 502, "upstream_error", "adapter_load_failed"),
)


def classify(exc: LoragateError) -> tuple[int, str, str]:
    """(HTTP status, error type, code) for ``exc``; any other loragate error is a 502."""
    for cls, status, err_type, code in _MAPPING:
        if isinstance(exc, cls):
            return status, err_type, code
    return 502, "upstream_error", "upstream_unavailable"


def error_payload(message: str, err_type: str, code: str, param: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return json.dumps(body).encode()


def error_response(exc: LoragateError, *, headers: dict[str, str] | None = None) -> web.Response:
    """``exc`` as an OpenAI-shaped JSON answer (``headers`` added, e.g. the replica's id)."""
    if isinstance(exc, VllmRequestError):
        body = {"message": exc.message, "type": exc.err_type, "param": exc.param, "code": 400}
        return web.Response(
            status=400,
            body=json.dumps({"error": body}).encode(),
            content_type="application/json",
            headers=headers,
        )
    if isinstance(exc, VllmNotFoundError):
        body = {"message": exc.message, "type": "NotFoundError", "param": exc.param, "code": 404}
        return web.Response(
            status=404,
            body=json.dumps({"error": body}).encode(),
            content_type="application/json",
            headers=headers,
        )
    status, err_type, code = classify(exc)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    elif status == 415:
        headers = {**(headers or {}), "Accept-Encoding": ACCEPT_ENCODING}
    elif isinstance(exc, UpstreamTimeoutError) and not isinstance(exc, AdapterLoadTimeoutError):
        # The replica ran the request for the whole request_timeout_s: sent again, it would
        # run as long again (the OpenAI SDKs retry a 504 twice unless told not to). Not after
        # a wait for an adapter's load that ran out: the replica never got the request.
        headers = {**(headers or {}), "x-should-retry": "false"}
    elif isinstance(exc, NoReplicaAvailableError):
        headers = {**(headers or {}), "Retry-After": NO_REPLICA_RETRY_AFTER}
    response = web.Response(
        status=status,
        body=error_payload(exc.message, err_type, code, exc.param),
        content_type="application/json",
        headers=headers,
    )
    if isinstance(
        exc,
        UnreadableBodyError | ClientBodyTimeoutError | PayloadTooLargeError | ShuttingDownError,
    ):
        # The server closes the connection after this answer (the rest of the body cannot be
        # skipped or is not worth reading, or the gateway is going away): say so (Connection:
        # close), rather than let the client reuse it (or go on sending a large body).
        response.force_close()
    return response


def internal_error_response(*, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=500,
        body=error_payload("internal gateway error", "server_error", "internal_error"),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(exc: LoragateError) -> bytes:
    """The end of a stream that broke off: an error event (the ``openai`` SDK raises
    ``APIError`` when an event's data carries an ``error`` key), then ``data: [DONE]``, as vLLM's
    stream generators end after their own error event (a client that reads to ``[DONE]`` is not
    left waiting for it)."""
    _, err_type, code = classify(exc)
    payload = error_payload(exc.message, err_type, code, exc.param)
    return b"data: " + payload + b"\n\ndata: [DONE]\n\n"
