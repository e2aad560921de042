"""A client that stops reading a whole (non-streamed) answer larger than the socket's buffers
is cut after ``limits.client_write_timeout_s`` as a stream's is: its connection is closed (the
gateway's DEBUG log says so). Before, aiohttp's write of the answer waited for the client with
no bound: its connection and aiohttp's handler task were held until the client closed (the
request's lease and in-flight count were released already). A client that reads gets the
whole answer. Real loopback sockets; the replica answers 16 MB."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import aiohttp
import pytest
from aiohttp import web
from gateway_harness import BASE, ScriptedReplica, gateway_config, serving, wait_until

from loragate.gateway import running_gateway

_TEXT = "x" * 16_000_000  # (loopback sockets take up to 4 MB of it: tcp_wmem)
_LIMITS = {"request_timeout_s": 120, "client_write_timeout_s": 0.5}
_STALLED = "took nothing of its answer"


class Big(ScriptedReplica):
    """Answers every completion with 16 MB of text."""

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        body = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": BASE,
            "choices": [{"index": 0, "text": _TEXT, "finish_reason": "length"}],
        }
        return web.json_response(body)


def _request() -> bytes:
    body = json.dumps({"model": BASE, "prompt": "p"}).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _handling() -> int:
    """aiohttp's tasks that handle a request (they write its answer) in this process: the
    gateway's and the replica's."""
    return sum(
        getattr(t.get_coro(), "__qualname__", "") == "RequestHandler._handle_request"
        for t in asyncio.all_tasks()
    )


def _read_to_the_end(sock: socket.socket) -> bytes:
    """What the gateway sent before it closed the connection (reset or EOF)."""
    got = bytearray()
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return bytes(got)


async def test_a_client_that_stops_reading_a_whole_answer_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="loragate.gateway.proxy")
    rep = Big("r0")
    async with serving(rep.app) as (url, _):
        cfg = gateway_config([url], limits=_LIMITS)
        async with running_gateway(cfg, port=0) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((gw.host, gw.port))
            try:
                sock.sendall(_request())  # and then read nothing
                await wait_until(lambda: len(rep.requests) == 1, "the replica to answer")

                # The client never read: the gateway gave up on it, its handler task ended
                # (before: it waited for the client until the client closed).
                await wait_until(lambda: _handling() == 0, "the gateway's handler to end")
                sock.settimeout(15)  # (a hang guard: the gateway closed the connection)
                got = await asyncio.to_thread(_read_to_the_end, sock)
            finally:
                sock.close()
    (line,) = [r.getMessage() for r in caplog.records if _STALLED in r.getMessage()]
    assert "for 0.5 s (limits.client_write_timeout_s): its connection was closed" in line
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(got) < len(_TEXT)  # cut: the answer did not all go out


async def test_a_client_that_reads_gets_the_whole_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="loragate.gateway.proxy")
    rep = Big("r0")
    async with serving(rep.app) as (url, _):
        cfg = gateway_config([url], limits=_LIMITS)
        async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
            body = {"model": BASE, "prompt": "p"}
            for _ in range(2):  # (the connection is kept alive: the second reuses it)
                async with http.post(gw.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    answer = await resp.json()
                assert answer["choices"][0]["text"] == _TEXT
    assert not [r for r in caplog.records if _STALLED in r.getMessage()]
