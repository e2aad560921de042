"""The lean HTTP/1.1 upstream client against raw loopback servers that write scripted bytes
(split at awkward places, keep-alive or not, chunked or not, misbehaving)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from raw_http_server import read_request_body

from loragate.backends.upstream import UpstreamPool
from loragate.core.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeoutError

Script = Callable[[int], Sequence[bytes | float | None]]  # request index -> pieces/pauses/close


class RawServer:
    """Answers request i with ``script(i)``: bytes are written (and drained) one by one, a float
    pauses, ``None`` closes the connection. Counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.bodies: list[bytes] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                self.bodies.append(await read_request_body(reader))
                for piece in self.script(len(self.bodies) - 1):
                    if piece is None:
                        writer.close()
                        return
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                    else:
                        writer.write(piece)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


StartRaw = Callable[[Script], Awaitable[RawServer]]


@pytest.fixture
async def raw() -> AsyncIterator[StartRaw]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawServer:
        srv = RawServer(script)
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        servers.append(server)
        srv.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return srv

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _split_every(data: bytes, n: int) -> list[bytes | float]:
    out: list[bytes | float] = []
    for i in range(0, len(data), n):
        out += [data[i : i + n], 0.001]
    return out


JSON = b'{"id":"cmpl-1","choices":[{"text":" hi"}]}'
LENGTH_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(JSON)).encode() + b"\r\n\r\n" + JSON
)  # fmt: skip
EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS)
    + b"0\r\n\r\n"
)  # fmt: skip


async def test_length_body_in_pieces_and_keep_alive(raw: StartRaw) -> None:
    srv = await raw(lambda i: _split_every(LENGTH_RESPONSE, 7))
    pool = UpstreamPool(srv.url)
    for i in range(3):
        body = b'{"prompt": "%d"}' % i
        conn = await pool.start("/v1/completions", body, whole=True, timeout_s=5)
        assert (conn.status, conn.content_type, conn.body()) == (200, "application/json", JSON)
        pool.release(conn)
    assert srv.connections == 1  # one keep-alive connection served all three
    assert srv.bodies == [b'{"prompt": "0"}', b'{"prompt": "1"}', b'{"prompt": "2"}']
    pool.close()


@pytest.mark.parametrize("piece", [1, 5, 13, 1000])
async def test_chunked_stream_is_decoded_at_any_split(raw: StartRaw, piece: int) -> None:
    srv = await raw(lambda i: _split_every(CHUNKED, piece))
    pool = UpstreamPool(srv.url)
    conn = await pool.start("/v1/completions", b"{}", whole=False, timeout_s=5)
    assert conn.status == 200 and conn.content_type.startswith("text/event-stream")
    got = []
    while chunk := await conn.read_chunk(5):
        got.append(chunk)
    assert b"".join(got) == b"".join(EVENTS)
    pool.release(conn)
    # Whole-body mode decodes the same framing.
    conn = await pool.start("/v1/chat/completions", b"{}", whole=True, timeout_s=5)
    assert conn.body() == b"".join(EVENTS)
    pool.release(conn)
    assert srv.connections == 1
    pool.close()


async def test_body_until_close_and_connection_close(raw: StartRaw) -> None:
    until_close = [b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nab", 0.01, b"cd", None]
    srv = await raw(lambda i: until_close)
    pool = UpstreamPool(srv.url)
    for _ in range(2):
        conn = await pool.start("/v1/completions", b"{}", whole=True, timeout_s=5)
        assert conn.body() == b"abcd"
        pool.release(conn)
    assert srv.connections == 2  # not reusable: each request had its own connection
    pool.close()


async def test_stale_keep_alive_connection_is_retried_transparently(
    raw: StartRaw,
) -> None:
    # The server answers, then closes the idle connection without saying so.
    srv = await raw(lambda i: [LENGTH_RESPONSE, 0.05, None])
    pool = UpstreamPool(srv.url)
    conn = await pool.start("/v1/completions", b"{}", whole=True, timeout_s=5)
    pool.release(conn)
    await asyncio.sleep(0.2)  # the server has closed it by now
    conn = await pool.start("/v1/completions", b"{}", whole=True, timeout_s=5)
    assert conn.body() == JSON
    pool.release(conn)
    assert srv.connections == 2
    pool.close()


async def test_timeout_refusal_and_garbage(raw: StartRaw) -> None:
    hang = await raw(lambda i: [60.0])
    with pytest.raises(UpstreamTimeoutError):
        await UpstreamPool(hang.url).start("/v1/completions", b"{}", whole=True, timeout_s=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(UpstreamConnectError):
        await UpstreamPool(closed_url).start("/v1/completions", b"{}", whole=True, timeout_s=1)
    garbage = await raw(lambda i: [b"SSH-2.0-OpenSSH\r\n\r\n"])
    with pytest.raises(UpstreamProtocolError):
        await UpstreamPool(garbage.url).start("/v1/completions", b"{}", whole=True, timeout_s=1)
    dropped = await raw(lambda i: [None])
    with pytest.raises(UpstreamConnectError, match="before answering"):
        await UpstreamPool(dropped.url).start("/v1/completions", b"{}", whole=True, timeout_s=1)


async def test_stream_broken_midway_raises_after_the_relayed_part(
    raw: StartRaw,
) -> None:
    cut = CHUNKED[: CHUNKED.index(EVENTS[1]) + 5]
    srv = await raw(lambda i: [cut, 0.01, None])
    pool = UpstreamPool(srv.url)
    conn = await pool.start("/v1/completions", b"{}", whole=False, timeout_s=5)
    got = []
    with pytest.raises(UpstreamConnectError, match="middle"):
        while chunk := await conn.read_chunk(5):
            got.append(chunk)
    assert b"".join(got) == EVENTS[0] + EVENTS[1][:5]
    pool.release(conn)


async def test_silent_stream_times_out(raw: StartRaw) -> None:
    head = CHUNKED[: CHUNKED.index(b"\r\n\r\n") + 4]
    srv = await raw(lambda i: [head, 60.0])
    conn = await UpstreamPool(srv.url).start("/v1/completions", b"{}", whole=False, timeout_s=5)
    with pytest.raises(UpstreamTimeoutError):
        await conn.read_chunk(0.2)


async def test_timeouts_hold_per_request_on_a_reused_connection(raw: StartRaw) -> None:
    # One keep-alive connection, requests with different timeouts one after the other: each
    # request's own deadline applies, whatever the requests before it on that connection had.
    pauses = [0.0, 60.0, 0.0, 0.6, 0.0, 0.6]
    srv = await raw(lambda i: [pauses[i], LENGTH_RESPONSE])
    pool = UpstreamPool(srv.url)
    async with asyncio.timeout(20):  # a longer deadline applied by mistake fails the test
        conn = await pool.start("/v1/completions", b"{}", whole=True, timeout_s=120)
        pool.release(conn)
        # A shorter deadline than the previous request's: it fires.
        with pytest.raises(UpstreamTimeoutError):
            await pool.start("/v1/completions", b"{}", whole=True, timeout_s=0.2)
    assert srv.connections == 1
    # A longer deadline than the previous request's: the earlier one must not cut it short.
    # Same for a stream's reads after a whole answer with a short deadline.
    for whole in (True, False):
        conn = await pool.start("/v1/completions", b"{}", whole=True, timeout_s=0.3)
        pool.release(conn)
        conn = await pool.start("/v1/completions", b"{}", whole=whole, timeout_s=5)
        if not whole:
            while await conn.read_chunk(5):
                pass
        assert conn.body() == JSON if whole else conn.complete
        pool.release(conn)
    assert srv.connections == 2  # the timed-out connection was dropped, the rest reused it
    pool.close()
