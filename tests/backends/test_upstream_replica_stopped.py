"""``UpstreamPool.replica_stopped``: once a replica stopped listening, a request in progress
there that receives nothing for the grace fails with ``ReplicaStoppedError`` and its connection
is closed; one whose answer is still arriving is let through. ``connection_refused`` tells a
poll refused at connect (the listener closed) from one that timed out (real loopback sockets)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from raw_http_server import read_request_body

from loragate.backends.pool_health import connection_refused
from loragate.backends.upstream import ReplicaStoppedError, UpstreamPool
from loragate.core.errors import UpstreamConnectError

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
_PIECES = 8


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Streamer:
    """Answers with a chunked stream: ``_PIECES`` events ``gap_s`` apart, or (``silent``) its
    head and one event, then nothing. Counts the connections the gateway side closed."""

    def __init__(self, *, silent: bool, gap_s: float = 0.05) -> None:
        self.silent = silent
        self.gap_s = gap_s
        self.closed_by_peer = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request_body(reader)
            writer.write(_HEAD + _chunk(b"data: 0\n\n"))
            if self.silent:
                if not await reader.read(1):  # EOF: the other side closed the connection
                    self.closed_by_peer += 1
                return
            for i in range(1, _PIECES):
                await asyncio.sleep(self.gap_s)
                writer.write(_chunk(b"data: %d\n\n" % i))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(streamer: Streamer) -> AsyncIterator[str]:
    server = await asyncio.start_server(streamer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def _read_all(pool: UpstreamPool, *, grace_s: float) -> bytes:
    conn = await pool.start("/v1/completions", b"{}", whole=False, timeout_s=60)
    try:
        first = await conn.read_chunk(60)
        assert pool.replica_stopped(grace_s) == 1  # the replica stopped listening now
        assert pool.replica_stopped(grace_s) == 0  # told already
        parts = [first]
        while chunk := await conn.read_chunk(60):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        pool.release(conn)


async def test_a_silent_request_fails_after_the_grace_and_its_connection_closes() -> None:
    streamer = Streamer(silent=True)
    async with serving(streamer) as url:
        pool = UpstreamPool(url)
        with pytest.raises(ReplicaStoppedError) as caught:
            await _read_all(pool, grace_s=0.2)
        for _ in range(200):  # the server sees the close (a hang guard)
            if streamer.closed_by_peer:
                break
            await asyncio.sleep(0.01)
        pool.close()
    assert isinstance(caught.value, UpstreamConnectError)  # retried as a failed connection
    assert "stopped listening" in caught.value.message
    assert "in the middle of the answer" in caught.value.message
    assert streamer.closed_by_peer == 1


async def test_an_answer_still_arriving_is_let_through() -> None:
    # Events 50 ms apart, a grace of 0.5 s: each check finds bytes heard since the last.
    async with serving(Streamer(silent=False, gap_s=0.05)) as url:
        pool = UpstreamPool(url)
        body = await _read_all(pool, grace_s=0.5)
        pool.close()
    assert body == b"".join(b"data: %d\n\n" % i for i in range(_PIECES))


async def test_a_refused_connect_is_told_from_a_timeout() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = UpstreamPool(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectError) as refused:
        await pool.start("/v1/completions", b"{}", whole=True, timeout_s=5)
    timed_out = UpstreamConnectError("GET /health: connect timed out")
    timed_out.__cause__ = TimeoutError()
    several = UpstreamConnectError(
        "GET /health: ClientConnectorError: Multiple exceptions: [Errno 111] Connect call "
        "failed ('::1', 8000, 0, 0), [Errno 111] Connect call failed ('127.0.0.1', 8000)"
    )
    assert connection_refused(refused.value)
    assert connection_refused(several)
    assert not connection_refused(timed_out)
    assert not connection_refused(UpstreamConnectError("connection closed before answering"))
