"""A stream's client that stops reading (its connection open, nothing read) is cut after
``limits.client_write_timeout_s``: its connection is closed, the request counts as
``client_closed`` (the access log says it stalled), its in-flight lease is released and its
connection to the replica is closed (vLLM aborts the generation). Before, the gateway's write
waited for the client with no bound: the request, its lease (every instance's in-flight count
for the replica) and the replica's generation were held until the client closed (real loopback
sockets; the replica streams without end, the client never reads)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving,
    wait_until,
)
from metric_counts import counts

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import running_gateway

_EVENT = (
    b"data: "
    + json.dumps(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": BASE,
            "choices": [{"index": 0, "text": "x" * 8000, "finish_reason": None}],
        }
    ).encode()
    + b"\n\n"
)
# Every other limit far away: only the client's stall can end the request.
_LIMITS = {"request_timeout_s": 120, "stream_read_timeout_s": 120, "client_write_timeout_s": 0.5}


class Endless(ScriptedReplica):
    """Streams 8 kB events for as long as its client (the gateway) takes them."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.events = 0

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        while True:
            await resp.write(_EVENT)
            self.events += 1


def _request() -> bytes:
    body = json.dumps({"model": BASE, "prompt": "p", "stream": True}).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
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


async def test_a_client_that_stops_reading_a_stream_is_cut_and_its_lease_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="loragate.gateway.proxy")
    rep = Endless("r0")
    async with serving(rep.app) as (url, _):
        cfg = gateway_config([url], limits=_LIMITS)
        async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((gw.host, gw.port))
            try:
                sock.sendall(_request())  # and then read nothing
                proxy, shared = gw.gateway.proxy, gw.gateway.shared
                await wait_until(lambda: rep.events > 0, "the stream to begin")
                # The client never read: the gateway gave up on it, not the client.
                await wait_until(
                    lambda: proxy.in_flight == 0 and shared.in_flight_of("r0") == 0,
                    "the request and its lease to end",
                )
                await wait_until(lambda: rep.cancelled == 1, "the replica to see the gateway go")
                sock.settimeout(15)  # (a hang guard: the gateway closed the connection)
                got = await asyncio.to_thread(_read_to_the_end, sock)
            finally:
                sock.close()
            requests = await counts(http, gw.url, "loragate_requests_total")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert requests == {("r0", "client_closed"): 1}
    (line,) = [r.getMessage() for r in caplog.records if "status=client_closed" in r.getMessage()]
    assert "read nothing for 0.5 s (limits.client_write_timeout_s)" in line


def _read_slowly(sock: socket.socket, total: int) -> int:
    """Read ``total`` bytes a little at a time, steadily (a reader slower than the stream:
    its socket's buffers stay full); how many bytes came (fewer: the gateway closed)."""
    got = 0
    while got < total:
        data = sock.recv(4096)
        if not data:
            break
        got += len(data)
        time.sleep(0.01)
    return got


async def test_a_client_that_reads_slowly_but_steadily_is_not_cut() -> None:
    # The replica streams far faster than the client reads: the socket's buffers (megabytes
    # on Linux) fill, and every write of the gateway waits for the client. Each wait lasted
    # until the client had taken enough to bring the gateway's buffer down to its low-water
    # mark (about half the socket's send queue: longer than the write timeout at this pace),
    # so a client taking bytes every 10 ms was cut as one that read nothing. The deadline
    # runs from the last bytes the client took.
    rep = Endless("r0")
    limits = {**_LIMITS, "client_write_timeout_s": 2}
    async with serving(rep.app) as (url, _):
        cfg = gateway_config([url], limits=limits)
        async with running_gateway(cfg, port=0) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((gw.host, gw.port))
            try:
                sock.sendall(_request())
                sock.settimeout(15)  # (a hang guard)
                # 6 MB: more than the socket buffers hold, so the gateway wrote to this
                # client, and waited for it, all along.
                got = await asyncio.to_thread(_read_slowly, sock, 6_000_000)
                still = gw.gateway.proxy.in_flight, rep.cancelled
            finally:
                sock.close()
    assert got >= 6_000_000
    assert still == (1, 0)  # the stream was still going on, to the replica too


async def test_a_client_that_reads_gets_its_whole_stream_with_a_short_write_timeout(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([replicas[0].url], limits=_LIMITS)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        stream = await client.completions.create(model=BASE, prompt="p", stream=True)
        text = "".join([chunk.choices[0].text async for chunk in stream])
    assert text == " one two three"


@pytest.mark.parametrize("value", [0, -1, "soon", None])
def test_a_bad_client_write_timeout_fails_at_load_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "base_model": "m",
                "replicas": [{"id": "r0", "url": "http://127.0.0.1:1"}],
                "limits": {"client_write_timeout_s": value},
            }
        )
    assert "limits.client_write_timeout_s" in str(info.value)
