"""``UpstreamPool.replica_silent``: once a replica stopped answering its polls, its requests in
progress are watched as a whole: if none of their connections receives a byte for the grace,
each fails with ``ReplicaHungError`` (a ``ReplicaStoppedError``) and its connection is closed;
a byte on any of them (the replica is alive, only slow) spares them all, even one silent
meanwhile; a poll answered (``replica_answered``) ends the watch. Real loopback sockets: the
server answers the request whose body says ``talk`` with an event every 50 ms until told to
stop, ``flood`` with more events than the gateway buffers for a client then nothing, any other
with its head and one event, then nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from raw_http_server import read_request_body

from loragate.backends.upstream import (
    ReplicaHungError,
    ReplicaStoppedError,
    UpstreamConn,
    UpstreamPool,
)

_FLOOD = 400  # events a "flood" request gets before the silence

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    def __init__(self) -> None:
        self.quiet = asyncio.Event()  # set: the talking stream ends
        self.closed_by_peer = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            body = await read_request_body(reader)
            writer.write(_HEAD + _chunk(b"data: 0\n\n"))
            if body == b"flood":  # more events than the gateway buffers, then silent
                for _ in range(_FLOOD):
                    writer.write(_chunk(b"data: f\n\n"))
                    await writer.drain()
                    await asyncio.sleep(0.002)  # (one read each, mostly)
            elif body == b"talk":
                while not self.quiet.is_set():
                    await asyncio.sleep(0.05)
                    writer.write(_chunk(b"data: t\n\n"))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return
            if not await reader.read(1):  # silent until the other side closes
                self.closed_by_peer += 1
        except ConnectionError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[UpstreamPool]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = UpstreamPool(f"http://127.0.0.1:{port}")
    try:
        yield pool
    finally:
        pool.close()
        srv.close()


async def _open(pool: UpstreamPool, body: bytes) -> UpstreamConn:
    conn = await pool.start("/v1/completions", body, whole=False, timeout_s=60)
    assert await conn.read_chunk(60) == b"data: 0\n\n"
    return conn


async def _rest(conn: UpstreamConn) -> bytes:
    parts = []
    while chunk := await conn.read_chunk(60):
        parts.append(chunk)
    return b"".join(parts)


async def _ended(watch: asyncio.Future[tuple[bool, int]]) -> tuple[bool, int]:
    return await asyncio.wait_for(watch, 30)  # a hang guard


def _watch_result() -> tuple[asyncio.Future[tuple[bool, int]], Callable[[bool, int], None]]:
    watch: asyncio.Future[tuple[bool, int]] = asyncio.get_running_loop().create_future()

    def done(alive: bool, failed: int) -> None:
        watch.set_result((alive, failed))

    return watch, done


async def test_silent_requests_fail_once_the_whole_replica_was_silent() -> None:
    server = Server()
    async with serving(server) as pool:
        a, b = await _open(pool, b"a"), await _open(pool, b"b")
        watch, done = _watch_result()
        assert pool.replica_silent(0.2, "its polls timed out 2 times in a row", done) == 2
        assert pool.replica_silent(0.2, "again", done) == 0
        assert await _ended(watch) == (False, 2)
        for conn in (a, b):
            with pytest.raises(ReplicaHungError) as caught:
                await _rest(conn)
            pool.release(conn)
        for _ in range(200):  # the server sees both closes (a hang guard)
            if server.closed_by_peer == 2:
                break
            await asyncio.sleep(0.01)
    assert isinstance(caught.value, ReplicaStoppedError)  # handled as a stopped replica
    assert caught.value.message == (
        "stopped answering (its polls timed out 2 times in a row) and sent nothing on any "
        "connection for 0.2 s in the middle of the answer: the connection was closed"
    )
    assert server.closed_by_peer == 2


async def test_a_replica_still_sending_keeps_every_request_even_a_silent_one() -> None:
    server = Server()
    async with serving(server) as pool:
        talking, silent = await _open(pool, b"talk"), await _open(pool, b"quiet")
        reading = asyncio.create_task(_rest(talking))
        for _ in range(3):  # three watches in a row, each ended by the talking stream's bytes
            watch, done = _watch_result()
            assert pool.replica_silent(0.3, "its polls timed out", done) == 2
            assert await _ended(watch) == (True, 0)
        server.quiet.set()
        assert (await asyncio.wait_for(reading, 30)).endswith(b"data: t\n\n")
        pool.release(talking)
        assert not silent.ready  # still waiting, not failed
        pool.release(silent)


async def test_a_poll_answered_ends_the_watch() -> None:
    server = Server()
    async with serving(server) as pool:
        conn = await _open(pool, b"a")
        watch, done = _watch_result()
        assert pool.replica_silent(0.2, "its polls timed out", done) == 1
        pool.replica_answered()
        await asyncio.sleep(0.5)  # past the grace: nothing was judged
        assert not watch.done() and not conn.ready
        assert pool.replica_silent(0.2, "its polls timed out", done) == 1
        assert await _ended(watch) == (False, 1)
        with pytest.raises(ReplicaHungError):
            await _rest(conn)
        pool.release(conn)


async def test_a_connection_paused_for_a_client_not_reading_is_no_evidence_either_way() -> None:
    """A stream whose client does not read is paused once the gateway buffered 64 pieces: it is
    not read from, so the silence watch learns nothing from it. Before, it counted as alive and
    spared every request on a hung replica until stream_read_timeout_s."""
    server = Server()
    async with serving(server) as pool:
        flooded = await pool.start("/v1/completions", b"flood", whole=False, timeout_s=60)
        silent = await _open(pool, b"quiet")
        for _ in range(500):  # the gateway pauses reading it (a hang guard)
            if flooded._paused:
                break
            await asyncio.sleep(0.01)
        assert flooded._paused
        watch, done = _watch_result()
        assert pool.replica_silent(0.3, "its polls timed out", done) == 2
        assert await _ended(watch) == (False, 1)  # before: (True, 0)
        with pytest.raises(ReplicaHungError):
            await _rest(silent)
        pool.release(silent)
        assert flooded._error is None  # the paused one was not cut

        # Its client reads what arrived (reading resumes: the rest arrives), then nothing comes:
        # the next watch judges it.
        received = 0
        while received < _FLOOD + 1:
            received += (await flooded.read_chunk(60)).count(b"data: ")
        watch, done = _watch_result()
        assert pool.replica_silent(0.3, "its polls timed out", done) == 1
        assert await _ended(watch) == (False, 1)
        with pytest.raises(ReplicaHungError):
            await _rest(flooded)
        pool.release(flooded)
