"""A connection that does not send a complete request head within
``limits.client_header_timeout_s`` (part of a head without its blank line, or nothing at all)
is closed and counted in ``/metrics``; an idle keep-alive connection is not (real loopback
sockets)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import RunningGateway, running_gateway

_TIMEOUT_S = 0.5
_PARTIAL = b"GET /health HTTP/1.1\r\nHost: gw\r\n"  # no blank line: the head never ends
_REQUEST = _PARTIAL + b"\r\n"


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (the timeout only bounds a hang: without the
    deadline the connection stays open for aiohttp's keep-alive timeout, an hour)."""
    return await asyncio.wait_for(reader.read(), timeout=15)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=15)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), timeout=15)
    return head.split(b"\r\n")[0]


async def _header_timeouts(gw: RunningGateway) -> float:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    (line,) = [x for x in text.splitlines() if x.startswith("loragate_client_header_timeouts")]
    return float(line.split()[-1])


async def test_connections_without_a_complete_head_are_closed_and_counted(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas], limits={"client_header_timeout_s": _TIMEOUT_S})
    async with running_gateway(cfg, port=0) as gw:
        # A keep-alive connection that was answered and then sits idle: not limited.
        idle_r, idle_w = await asyncio.open_connection(gw.host, gw.port)
        idle_w.write(_REQUEST)
        assert await _answer(idle_r) == b"HTTP/1.1 200 OK"
        conns = [await asyncio.open_connection(gw.host, gw.port) for _ in range(6)]
        for _, writer in conns[:4]:
            writer.write(_PARTIAL)  # part of a head, and then nothing
        conns[4][1].write(b"G")  # one byte
        # conns[5] sends nothing at all.
        # A keep-alive connection whose second head stays incomplete: limited from its first
        # byte.
        ka_r, ka_w = await asyncio.open_connection(gw.host, gw.port)
        ka_w.write(_REQUEST)
        assert await _answer(ka_r) == b"HTTP/1.1 200 OK"
        ka_w.write(_PARTIAL)
        try:
            for reader, _ in [*conns, (ka_r, ka_w)]:
                assert await _closed_by_server(reader) == b""  # closed without an answer
            assert await _header_timeouts(gw) == 7.0
            # The idle keep-alive connection has outlived every deadline and still serves.
            idle_w.write(_REQUEST)
            assert await _answer(idle_r) == b"HTTP/1.1 200 OK"
        finally:
            for _, writer in [*conns, (ka_r, ka_w), (idle_r, idle_w)]:
                writer.close()
        assert await _header_timeouts(gw) == 7.0


async def test_a_head_sent_in_pieces_within_the_deadline_is_served(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas], limits={"client_header_timeout_s": 30})
    async with running_gateway(cfg, port=0) as gw:
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            for piece in (_PARTIAL[:5], _PARTIAL[5:], b"\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            assert await _answer(reader) == b"HTTP/1.1 200 OK"
        finally:
            writer.close()
        assert await _header_timeouts(gw) == 0.0


@pytest.mark.parametrize("value", [0, -1, "soon", None])
def test_a_bad_client_header_timeout_fails_at_load_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "base_model": "m",
                "replicas": [{"id": "r0", "url": "http://127.0.0.1:1"}],
                "limits": {"client_header_timeout_s": value},
            }
        )
    assert "limits.client_header_timeout_s" in str(info.value)
