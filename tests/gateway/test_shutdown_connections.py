"""A gateway that stops listening answers every connection the kernel accepted: one waiting in
the listen backlog, one accepted but silent until after the listener closed, and an idle
keep-alive connection whose next request reaches the gateway as the listener closes each get
their request served (``Connection: close``), not a reset or a silent close. Raw loopback
sockets; the interleavings are set by the event loop's order, not by timing (waits are hang
guards only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, gateway_in_background, wait_until

from loragate.core.config import GatewayConfig
from loragate.gateway import RunningGateway

RUNNER_LOG = "loragate.gateway.runner"
_BODY = json.dumps({"model": BASE, "prompt": "p", "max_tokens": 2}).encode()
_REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


def _gateway(
    config: GatewayConfig, *, grace_s: float = 60.0
) -> contextlib.AbstractAsyncContextManager[
    tuple[RunningGateway, asyncio.Event, asyncio.Task[None]]
]:
    """The gateway in a task of its own (``gateway_in_background``), with a long drain."""
    return gateway_in_background(config, shutdown_timeout_s=600, first_request_grace_s=grace_s)


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """The status line, headers (lower-case names) and body of an answer whose connection then
    closes; raises (ConnectionResetError, IncompleteReadError) if there is none."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
    body = await asyncio.wait_for(reader.read(), timeout=30)  # to the close
    return status.encode(), headers, body


def _served(answer: tuple[bytes, dict[str, str], bytes]) -> None:
    status, headers, body = answer
    assert status.startswith(b"HTTP/1.1 200"), answer
    assert headers["connection"].lower() == "close"
    assert json.loads(body)["choices"][0]["text"] == "hi from r0"


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.name == RUNNER_LOG)


async def test_a_connection_waiting_in_the_listen_backlog_is_served(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    async with _gateway(gateway_config([replicas[0].url])) as (gw, stop, shutdown):
        stop.set()
        # Connected by the kernel (blocking connect, the loop does not run meanwhile) and the
        # request sent: the listener closes before the loop ever polls it.
        sock = socket.create_connection((gw.host, gw.port), timeout=30)
        sock.sendall(_REQUEST)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        _served(await _answer(reader))
        writer.close()
        await asyncio.wait_for(shutdown, timeout=30)
    assert _logged(caplog, "1 request received after the listener closed (served)")
    assert _logged(caplog, "1 connection taken from the listen backlog")


async def test_a_connection_silent_until_the_listener_closed_is_served(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    async with _gateway(gateway_config([replicas[0].url])) as (gw, stop, shutdown):
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        stop.set()
        await wait_until(lambda: gw.gateway.shutting_down, "the shutdown to begin")
        with pytest.raises(ConnectionRefusedError):  # the listener is closed
            await asyncio.open_connection(gw.host, gw.port)
        writer.write(_REQUEST)  # the first request of a connection accepted before that
        _served(await _answer(reader))
        writer.close()
        await asyncio.wait_for(shutdown, timeout=30)
    assert _logged(caplog, "1 request received after the listener closed (served)")


async def test_a_request_reaching_an_idle_keep_alive_connection_as_the_listener_closes(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    """The request's bytes reach the gateway after the listener closed, before the event loop
    read them: they are read and served, not dropped with the connection (which, closed with
    unread data, would also send a reset)."""
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    async with _gateway(gateway_config([replicas[0].url])) as (gw, stop, shutdown):
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert b"connection: close" not in head.lower()  # kept alive
        stop.set()
        await asyncio.sleep(0)  # the gateway's shutdown step runs first: the listener closes
        writer.write(_REQUEST)  # (sent now, in the kernel before the loop polls again)
        _served(await _answer(reader))
        writer.close()
        await asyncio.wait_for(shutdown, timeout=30)
    assert _logged(caplog, "1 request received after the listener closed (served)")


async def test_idle_and_silent_connections_are_closed_and_counted(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    config = gateway_config([replicas[0].url])
    async with _gateway(config, grace_s=0.05) as (gw, stop, shutdown):
        silent_r, silent_w = await asyncio.open_connection(gw.host, gw.port)
        idle_r, idle_w = await asyncio.open_connection(gw.host, gw.port)
        idle_w.write(b"GET /livez HTTP/1.1\r\nHost: gw\r\n\r\n")
        # Answered: the gateway accepted both connections (the silent one first).
        await asyncio.wait_for(idle_r.readuntil(b"\r\n\r\n"), timeout=30)
        stop.set()
        await asyncio.wait_for(shutdown, timeout=30)
        assert await asyncio.wait_for(silent_r.read(), timeout=30) == b""  # closed
        assert await asyncio.wait_for(idle_r.read(), timeout=30) == b'{"status": "ok"}'
        idle_w.close()
        silent_w.close()
    assert _logged(caplog, "0 requests received after the listener closed (served)")
    assert _logged(caplog, "0 connections taken from the listen backlog; 1 idle closed")
    assert _logged(caplog, "1 closed without sending a request")
