"""Requests aiohttp's HTTP parser rejects before any handler runs get an OpenAI-shaped JSON
error with aiohttp's status, over raw loopback sockets; the gateway keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import RunningGateway, running_gateway
from loragate.gateway.protocol_errors import OpenAIErrorAppRunner, describe_protocol_error

BAD_REQUESTS = {
    "header value over 8190 bytes": (
        b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        "longer than 8190 bytes",
    ),
    "malformed request line": (
        b"GET /health HTTP/1.1 trailing junk\r\nHost: gw\r\n\r\n",
        "Bad status line",
    ),
    "invalid method": (b"G@T /health HTTP/1.1\r\nHost: gw\r\n\r\n", "method"),
    "bad Transfer-Encoding": (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n",
        "Transfer-Encoding",
    ),
    "missing Host": (b"GET /health HTTP/1.1\r\n\r\n", "Missing 'Host' header in request"),
    "two Host headers": (
        b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "Duplicate 'Host' header found",
    ),
    "bad chunk size": (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "chunk",  # "Invalid character in chunk size" (C parser) or "... chunked ..." (Python)
    ),
}


@pytest.fixture
async def gateway(replicas: list[ScriptedReplica]) -> AsyncIterator[RunningGateway]:
    async with running_gateway(gateway_config([r.url for r in replicas]), port=0) as gw:
        yield gw


async def _raw_exchange(gw: RunningGateway, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a fresh connection and read until the server closes it (the timeout
    only keeps a broken server from hanging the test)."""
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def _assert_openai_error(body: bytes, err_type: str) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == err_type
    assert isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]


async def _http_errors_counted(gw: RunningGateway) -> dict[str, float]:
    """``loragate_http_errors_total`` by status, from the gateway's ``/metrics``."""
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    counted = {}
    for line in text.splitlines():
        if line.startswith("loragate_http_errors_total{"):
            labels, _, value = line.rpartition(" ")
            counted[labels.split('status="')[1].split('"')[0]] = float(value)
    return counted


async def _assert_still_serving(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] in ("ok", "degraded")


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_parser_errors_get_an_openai_error_and_the_gateway_keeps_serving(
    gateway: RunningGateway, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, expected_in_message = BAD_REQUESTS[case]
    assert await _http_errors_counted(gateway) == {}
    with caplog.at_level(logging.DEBUG, logger="loragate.gateway.protocol_errors"):
        status, headers, body = await _raw_exchange(gateway, raw)
    assert status == 400  # the status aiohttp chose for every parser error (3.14)
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)  # the whole body, then the close
    err = _assert_openai_error(body, "invalid_request_error")
    assert err["code"] == "invalid_http_request" and err["param"] is None
    assert expected_in_message in err["message"]
    # aiohttp's internals stay out of the answer: no echoed bytes, caret or traceback.
    for internal in ("b'", "bytearray", "^", "Traceback", "\n"):
        assert internal not in err["message"]
    rejected = [r for r in caplog.records if r.name == "loragate.gateway.protocol_errors"]
    assert len(rejected) == 1
    # A bad method is mostly non-HTTP traffic (TLS to a plain port): DEBUG, not WARNING.
    level = logging.DEBUG if case == "invalid method" else logging.WARNING
    assert rejected[0].levelno == level and rejected[0].exc_info is None
    assert "127.0.0.1" in rejected[0].getMessage()
    assert not [r for r in caplog.records if r.name == "aiohttp.server"]
    await _assert_still_serving(gateway)
    assert await _http_errors_counted(gateway) == {"400": 1.0}  # and nothing else


async def test_the_connection_closes_after_the_error_even_if_keep_alive_was_asked(
    gateway: RunningGateway,
) -> None:
    """Bytes after the bad request are not answered: ``_raw_exchange`` returns only once the
    server closed the connection, with exactly one (error) response."""
    raw = BAD_REQUESTS["malformed request line"][0] + b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
    status, headers, body = await _raw_exchange(gateway, raw)
    assert status == 400 and headers.get("connection", "close").lower() == "close"
    _assert_openai_error(body, "invalid_request_error")
    assert b"HTTP/1." not in body
    await _assert_still_serving(gateway)


def test_describe_protocol_error_drops_the_echoed_bytes_and_the_caret() -> None:
    message = (
        "Content-Length can't be present with Transfer-Encoding:\n\n  b'Content-Length: 3'\n  ^"
    )
    assert describe_protocol_error(None, message) == (
        "Content-Length can't be present with Transfer-Encoding"
    )
    assert describe_protocol_error(None, "Invalid HTTP header: b'X Y'") == "Invalid HTTP header"
    assert describe_protocol_error(None, None) == ""
    # A str echo at the end goes too; a quoted word inside the message stays.
    assert describe_protocol_error(None, "Bad status line 'G@T /x'") == "Bad status line"
    assert describe_protocol_error(None, "Got more than 9 bytes when reading: b'aa'.") == (
        "Got more than 9 bytes when reading"
    )
    assert describe_protocol_error(None, "Missing 'Host' header in request.") == (
        "Missing 'Host' header in request"
    )
    assert describe_protocol_error(None, "Duplicate 'Host' header found.") == (
        "Duplicate 'Host' header found"
    )


@pytest.mark.filterwarnings("ignore:debug argument is deprecated:DeprecationWarning")
async def test_a_handler_that_raises_gets_a_server_error_without_the_traceback() -> None:
    """The same hook answers aiohttp's own 500 (even in debug mode, where aiohttp would send
    the traceback) in the OpenAI shape."""

    async def boom(_: web.Request) -> web.Response:
        raise RuntimeError("internal detail")

    app = web.Application(debug=True)  # deprecated, but still how aiohttp's debug is set
    app.router.add_get("/boom", boom)
    statuses: list[int] = []
    runner = OpenAIErrorAppRunner(app, access_log=None, on_error=statuses.append)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/boom") as r:
            assert r.status == 500 and r.content_type == "application/json"
            body = await r.read()
    finally:
        await runner.cleanup()
    err = _assert_openai_error(body, "server_error")
    assert err["code"] == "internal_error" and b"internal detail" not in body
    assert statuses == [500]


async def test_a_flood_of_bad_requests_logs_one_warning_and_counts_them_all(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """As failed logins: one WARNING a minute at most (saying how to see the rest), the rest
    at DEBUG; every one counted."""
    raw = BAD_REQUESTS["malformed request line"][0]
    with caplog.at_level(logging.DEBUG, logger="loragate.gateway.protocol_errors"):
        for _ in range(30):
            status, _, body = await _raw_exchange(gateway, raw)
            assert status == 400
            _assert_openai_error(body, "invalid_request_error")
    rejected = [r for r in caplog.records if r.name == "loragate.gateway.protocol_errors"]
    assert [r.levelno for r in rejected] == [logging.WARNING] + [logging.DEBUG] * 29
    assert "at most one such line per 60 s" in rejected[0].getMessage()
    assert all("rejected request" in r.getMessage() for r in rejected)
    assert await _http_errors_counted(gateway) == {"400": 30.0}
