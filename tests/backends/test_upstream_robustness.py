"""The lean upstream client's keep-alive pool when a replica goes away under it: a request the
replica never read is retried once on a fresh connection; one it did read is never sent again.
Also malformed framing from the replica is a clear protocol error (real loopback sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator

import pytest
from raw_http_server import read_request_body

from loragate.backends.upstream import UpstreamPool
from loragate.core.errors import UpstreamConnectError, UpstreamProtocolError

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Replica:
    """Answers each request with ``answer`` (bytes) unless told to misbehave; records every
    request body it read and keeps its connections' writers so a test can kill them."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.answer: bytes | None = OK  # None: read the request, then close without answering
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                self.bodies.append(await read_request_body(reader))
                if self.answer is None:
                    break
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def reset_connections(self) -> None:
        """Kill every open connection with a TCP reset (SO_LINGER 0), like a replica process
        that died: bytes that reach it afterwards were never read by anyone."""
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self.writers.clear()


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    rep = Replica()
    server = await asyncio.start_server(rep.handle, "127.0.0.1", 0)
    rep.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    yield rep
    server.close()
    await server.wait_closed()


async def _post(pool: UpstreamPool, body: bytes) -> bytes:
    conn = await pool.start("/v1/completions", body, whole=True, timeout_s=5)
    try:
        return conn.body()
    finally:
        pool.release(conn)


async def test_request_the_replica_never_read_is_retried_once_on_a_fresh_connection(
    replica: Replica,
) -> None:
    pool = UpstreamPool(replica.url)
    assert await _post(pool, b"1") == b"{}"
    # The replica resets the idle connection; the request is written before the event loop
    # has seen the reset (the race a reused keep-alive connection always has).
    conn = await pool.start("/v1/completions", b"2", whole=True, timeout_s=5)
    pool.release(conn)
    replica.reset_connections()
    assert await _post(pool, b"3") == b"{}"
    assert replica.bodies == [b"1", b"2", b"3"]  # "3" read exactly once, on a new connection
    pool.close()


async def test_request_the_replica_read_is_never_sent_twice(replica: Replica) -> None:
    pool = UpstreamPool(replica.url)
    assert await _post(pool, b"1") == b"{}"
    replica.answer = None  # reads the next request, then closes the connection
    with pytest.raises(UpstreamConnectError, match="before answering"):
        await _post(pool, b"2")
    assert replica.bodies == [b"1", b"2"]
    replica.answer = OK
    assert await _post(pool, b"3") == b"{}"  # the pool recovers on a fresh connection
    pool.close()


@pytest.mark.parametrize(
    "framing",
    [
        b"transfer-encoding: chunked\r\n\r\n-2\r\nhi\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\n\r\n+2\r\nhi\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n",
        b"content-length: -5\r\n\r\n{}",
        b"content-length: two\r\n\r\n{}",
    ],
)
async def test_malformed_framing_is_a_protocol_error(replica: Replica, framing: bytes) -> None:
    replica.answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + framing
    pool = UpstreamPool(replica.url)
    with pytest.raises(UpstreamProtocolError):
        await _post(pool, b"{}")
    pool.close()


def _serve_then_close(
    listener: socket.socket, bodies: list[bytes], closed: threading.Event, answers: int
) -> None:
    """A blocking server thread: each connection gets one answer, then a clean close (FIN),
    like a replica whose keep-alive timeout fired right after answering."""
    for _ in range(answers):
        sock, _ = listener.accept()
        with sock:
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(65536)
            bodies.append(body)
            sock.sendall(OK)
        closed.set()


async def test_keep_alive_connection_the_replica_closed_is_not_reused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)  # the thread gives up if no second connection comes
    bodies: list[bytes] = []
    closed = threading.Event()
    loop = asyncio.get_running_loop()
    server = loop.run_in_executor(None, _serve_then_close, listener, bodies, closed, 2)
    pool = UpstreamPool(f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        assert await _post(pool, b"1") == b"{}"
        # The replica closes the idle connection and its FIN reaches this host while the
        # event loop is busy (blocking waits, no await): the loop has not seen the close when
        # the next request picks a connection.
        assert closed.wait(10)
        time.sleep(0.3)  # noqa: ASYNC251 -- blocking on purpose: the loop must not run
        assert await _post(pool, b"2") == b"{}"
    finally:
        pool.close()
        with contextlib.suppress(OSError):
            await server
        listener.close()
    assert bodies == [b"1", b"2"]


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 20 OK", b"HTTP/1.1 099 X", b"HTTP/1.1 1000", b"HTTP/1.1 600 Nope",
     b"HTTP/1.1 -20 x", b"HTTP/1.1 2_0 x", b"HTTP/1.1 101 Switching Protocols"],
)  # fmt: skip
async def test_bad_status_line_is_a_protocol_error(replica: Replica, status_line: bytes) -> None:
    replica.answer = status_line + b"\r\ncontent-length: 2\r\n\r\n{}"
    pool = UpstreamPool(replica.url)
    with pytest.raises(UpstreamProtocolError, match="status line"):
        await _post(pool, b"{}")
    pool.close()


@pytest.mark.parametrize("whole", [True, False])
async def test_interim_answers_are_skipped(replica: Replica, whole: bool) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
    replica.answer = interim + OK
    pool = UpstreamPool(replica.url)
    for _ in range(2):  # and the connection stays usable
        conn = await pool.start("/v1/completions", b"{}", whole=whole, timeout_s=5)
        assert (conn.status, conn.content_type) == (200, "application/json")
        body = conn.body() if whole else await conn.read_chunk(5)
        assert body == b"{}"
        if not whole:
            assert await conn.read_chunk(5) == b""
        pool.release(conn)
    assert len(replica.writers) == 1
    pool.close()
