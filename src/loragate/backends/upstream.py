"""A lean HTTP/1.1 keep-alive client for the proxy hot path (POST a JSON body, relay the answer).

Why not ``aiohttp.ClientSession`` here: per request it builds a ClientRequest, a ClientResponse,
a StreamReader, header multidicts, timer contexts and trace hooks, which cost more CPU than the
rest of the gateway together (measured: a plain aiohttp pass-through proxy spends ~110 us of
its ~170 us per request in the client). This client writes one precomputed request head plus
the body in one call, parses only the status line and the four headers it needs, and hands
back the body as bytes or as chunks as they arrive. Admin calls, polling and anything not on
the hot path keep using aiohttp (``loragate.backends.client``).

Supported responses: ``Content-Length`` bodies, ``Transfer-Encoding: chunked`` bodies (decoded;
trailers ignored) and bodies delimited by connection close (a clean close, EOF: one the replica
resets is cut short, an error like any connection lost mid-answer). Connections are reused while the
server allows it; an idle connection older than ``keepalive_s`` is dropped (servers close idle
ones: uvicorn after 5 s). A reused connection that the replica *reset* before any response byte
(its bytes reached a socket nobody reads: the replica had closed or lost it) is retried once on
a fresh one, transparently. One that the replica closed cleanly after the request went out is
not: the replica may have read the request, and a POST must not be delivered twice.

A replica that stopped listening (the pool's poll could not connect: vLLM closes its listener
at once on SIGTERM, then may wait for its connections to close before it exits) may leave the
requests it holds waiting for answers that will not come (an engine killed before its abort
answers got out). :meth:`UpstreamPool.replica_stopped` wakes them: each connection in use that
then receives nothing for ``grace_s`` fails with :class:`ReplicaStoppedError` and is closed
(bytes still arriving restart its grace: an answer on its way is let through).

A replica that stopped answering (its polls time out: a hung process, e.g. SIGSTOPped, or a
wedged engine, keeps its sockets open and sends nothing) may leave the requests it holds
waiting for ``limits.stream_read_timeout_s`` / ``request_timeout_s``.
:meth:`UpstreamPool.replica_silent` watches the replica as a whole: if nothing arrives on any
of its connections for ``grace_s``, each request in progress there fails with
:class:`ReplicaHungError` and its connection is closed; a byte on any of them (a stream still
producing, an answer completing) shows the replica is alive, only slow, and none is failed (a
request silent on a replica that still sends elsewhere, e.g. queued behind the others, waits
as before). A connection not read from because its client reads slowly (paused) is evidence
neither way: it spares none and is not failed (a later watch judges it once its client caught
up). The pool keeps the connections in use in a set (an add and a discard per
request); a read adds one to a counter, nothing is checked per read.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import select
import ssl
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from loragate.core.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)


class ReplicaStoppedError(UpstreamConnectError):
    """The replica stopped listening (its poll could not connect) and sent nothing on this
    connection for the grace that followed: the request is not answered there."""


class ReplicaHungError(ReplicaStoppedError):
    """The replica stopped answering (its polls timed out) and sent nothing on any of its
    connections for the grace that followed: the request is not answered there. (A
    :class:`ReplicaStoppedError`: handled alike, retried elsewhere if nothing reached the
    client.)"""


_MAX_HEAD_BYTES = 64 * 1024
_HEAD_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a header value (HTAB is)
# An idle connection older than this is checked for a close the event loop has not handled
# yet before it is reused (one select() call; servers' keep-alive timeouts are seconds).
_CHECK_IDLE_AFTER_S = 0.2
# A check of a replica's silence (``UpstreamPool.replica_silent``) that fires this late decides
# nothing: the event loop was blocked, and what the replica sent may not have been read yet.
_SILENCE_LATE_S = 0.5
# A deadline timer that fires this close to the deadline counts as on time (uvloop's timers
# have millisecond resolution, so they may fire a fraction of a millisecond early).
_TIMER_SLACK_S = 0.001

# body framing
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NONE = range(4)
# chunked decoder states
_C_SIZE, _C_DATA, _C_DATA_END, _C_TRAILER = range(4)


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time."""

    __slots__ = (
        "_body",
        "_buf",
        "_c_left",
        "_c_state",
        "_chunks",
        "_deadline",
        "_done",
        "_error",
        "_framing",
        "_got_bytes",
        "_head_waiter",
        "_left",
        "_loop",
        "_paused",
        "_peer_reset",
        "_read_waiter",
        "_reads",
        "_stop_grace_s",
        "_stop_mark",
        "_stop_timer",
        "_timer",
        "_timer_at",
        "_whole",
        "closed",
        "content_type",
        "idle_since",
        "reusable",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._peer_reset = False
        # Timeouts are deadlines (loop time; 0.0 = none running) checked by one timer that
        # outlives the request: the next request's deadline reuses it when it fires no later
        # (one call_at per connection instead of a timer made and cancelled per wait).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Reads (data_received calls) over the connection's life: a check of a replica's
        # silence compares it with the count it noted (:meth:`replica_stopped`: ``_stop_mark``;
        # ``UpstreamPool.replica_silent``).
        self._reads = 0
        # The replica stopped listening (:meth:`replica_stopped`): the reads counted at the
        # last check of its grace, and the check's timer.
        self._stop_mark = 0
        self._stop_grace_s = 0.0
        self._stop_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        self._buf = bytearray()
        self._body: list[bytes] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._head_waiter: asyncio.Future[None] | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._error: Exception | None = None
        self._done = False
        self._got_bytes = False
        self._whole = True
        self._paused = False
        self._framing = _NONE
        self._left = 0
        self._c_state = _C_SIZE
        self._c_left = 0
        self.status = 0
        self.content_type = ""
        self.reusable = True

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_timer()
        self._peer_reset = exc is not None  # ECONNRESET / EPIPE, not a clean close (EOF)
        if self._done or (
            self._head_waiter is None and self._read_waiter is None and not self.status
        ):
            return
        if self.status and self._framing == _UNTIL_CLOSE and exc is None:
            self._finish()  # the body's end: a clean close (EOF)
            return
        # (a body framed by the close that ends in a reset is cut short: the replica died)
        how = "reset" if exc is not None else "closed"
        self._fail(UpstreamConnectError(f"connection {how} {self._where}"))

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._reads += 1
        if self.status:
            self._feed(data)
            return
        buf = self._buf
        if buf:  # the head came in pieces
            buf += data
            end = buf.find(_HEAD_END)
            if end >= 0:
                data = bytes(buf)
                buf.clear()
        else:  # usually the whole head comes in one read: no copy into the buffer
            end = data.find(_HEAD_END)
            if end < 0:
                buf += data
        if end < 0:
            if len(buf) > _MAX_HEAD_BYTES:
                self._fail(UpstreamProtocolError("response head too large"))
            return
        try:
            self._parse_head(data[:end])
        except (ValueError, IndexError) as exc:
            self._fail(UpstreamProtocolError(f"bad response head: {exc}"))
            return
        rest = data[end + 4 :]
        if self.status < 200:  # an interim answer (100 Continue, 103 Early Hints): skip it
            self.status = 0
            self.content_type = ""
            if rest:
                self.data_received(rest)
            return
        if not self._whole:  # streaming: the head is the answer's start; reads time themselves
            self._cancel_timer()
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._framing == _NONE or (self._framing == _LENGTH and self._left == 0):
            self._finish()
        elif rest:
            self._feed(rest)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost handles the rest

    # -- parsing ----------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(_CRLF)
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
        code = status_line[9:12]
        status = int(code) if code.isdigit() and status_line[12:13] in (b"", b" ") else 0
        if not 100 <= status <= 599 or status == 101:  # 101: we never ask to switch protocols
            raise ValueError(f"bad status line {status_line[:40]!r}")
        self.status = status
        keep_alive = status_line[7:8] == b"1"  # HTTP/1.1 defaults to keep-alive
        length = -1
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
                if length < 0:
                    raise ValueError(f"negative content-length {length}")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-type":
                value = value.strip()
                if _CONTROL.search(value):
                    # The proxy relays it: a bare CR would be a header injection (aiohttp
                    # refuses to send it, after the answer had begun).
                    raise ValueError(f"control character in content-type {value[:40]!r}")
                self.content_type = value.decode("latin-1")
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    keep_alive = False
                elif token == b"keep-alive":
                    keep_alive = True
        self.reusable = keep_alive
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._framing = _NONE
        elif chunked:
            self._framing = _CHUNKED
        elif length >= 0:
            self._framing = _LENGTH
            self._left = length
        else:
            self._framing = _UNTIL_CLOSE
            self.reusable = False

    def _feed(self, data: bytes) -> None:
        framing = self._framing
        if framing == _LENGTH:
            n = len(data)
            if n >= self._left:
                if n > self._left:  # extra bytes after the body: do not reuse
                    data = data[: self._left]
                    self.reusable = False
                self._left = 0
                self._deliver(data)
                self._finish()
            else:
                self._left -= n
                self._deliver(data)
        elif framing == _CHUNKED:
            try:
                self._feed_chunked(data)
            except ValueError as exc:
                self._fail(UpstreamProtocolError(f"bad chunked encoding: {exc}"))
        else:
            self._deliver(data)

    def _feed_chunked(self, data: bytes) -> None:
        """Decode chunked framing. Everything decoded from one read is delivered as one piece
        (an SSE stream's events arrive many to a read: one relay write instead of one each);
        only an incomplete size line is kept over to the next read."""
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        pieces: list[bytes] = []
        pos, n = 0, len(data)
        try:
            while pos < n:
                state = self._c_state
                if state == _C_DATA:
                    end = min(pos + self._c_left, n)
                    pieces.append(data[pos:end])
                    self._c_left -= end - pos
                    pos = end
                    if self._c_left == 0:
                        self._c_state = _C_DATA_END
                    continue
                i = data.find(_CRLF, pos)
                if i < 0:
                    if n - pos > 4096:
                        raise ValueError("chunk size line too long")
                    buf += data[pos:]
                    return
                line = data[pos:i]
                pos = i + 2
                if state == _C_SIZE:
                    digits = line.split(b";", 1)[0].strip()
                    if not digits or digits.strip(_HEX_DIGITS):  # int() would take "-1", "1_0"
                        raise ValueError(f"bad chunk size {digits[:20]!r}")
                    size = int(digits, 16)
                    if size == 0:
                        self._c_state = _C_TRAILER
                    else:
                        self._c_left = size
                        self._c_state = _C_DATA
                elif state == _C_DATA_END:
                    if line:
                        raise ValueError("missing CRLF after chunk data")
                    self._c_state = _C_SIZE
                elif not line:  # _C_TRAILER: the empty line ends the message
                    if pos < n:
                        self.reusable = False
                    self._deliver(b"".join(pieces))
                    pieces.clear()
                    self._finish()
                    return
        finally:
            if pieces:
                self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self._whole:
            self._body.append(data)
            return
        self._chunks.append(data)
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(self._chunks) > 64 and not self._paused and self.transport is not None:
            self._paused = True  # the client reads slower than the replica writes
            self.transport.pause_reading()

    def _finish(self) -> None:
        self._done = True
        self._cancel_timer()
        for waiter in (self._head_waiter, self._read_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self.reusable = False
        self._drop_timer()
        for waiter in (self._head_waiter, self._read_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _cancel_timer(self) -> None:
        self._deadline = 0.0  # the timer, if any, stays: a later wait may reuse it

    def _drop_timer(self) -> None:
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, timeout_s: float) -> None:
        """Fail the wait in progress unless it ends within ``timeout_s``."""
        loop = self._loop
        deadline = loop.time() + timeout_s
        self._deadline = deadline
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def replica_stopped(self, grace_s: float) -> bool:
        """The replica stopped listening: fail the request in progress once nothing arrives
        for ``grace_s`` (checked every ``grace_s``; a check that finds bytes heard since the
        last one waits another ``grace_s``). False if that was under way already (or the
        request is over)."""
        if self._stop_timer is not None or self.closed or self._done or self._error is not None:
            return False
        self._stop_mark = self._reads
        self._stop_grace_s = grace_s
        self._stop_timer = self._loop.call_later(grace_s, self._check_stopped)
        return True

    def _check_stopped(self) -> None:
        self._stop_timer = None
        if self.closed or self._done or self._error is not None:
            return
        grace_s = self._stop_grace_s
        if self._reads != self._stop_mark:  # still answering: let it
            self._stop_mark = self._reads
            self._stop_timer = self._loop.call_later(grace_s, self._check_stopped)
            return
        self._fail(
            ReplicaStoppedError(
                f"stopped listening (its poll could not connect) and sent nothing for "
                f"{grace_s:g} s {self._where}: the connection was closed"
            )
        )

    @property
    def _where(self) -> str:
        return "before answering" if not self._got_bytes else "in the middle of the answer"

    def fail_hung(self, why: str) -> bool:
        """The replica stopped answering (``why``: what showed it, and for how long nothing
        arrived): fail the request in progress with :class:`ReplicaHungError` and close the
        connection. False if the request is over."""
        if self.closed or self._done or self._error is not None:
            return False
        self._fail(ReplicaHungError(f"{why} {self._where}: the connection was closed"))
        return True

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline or self.closed:
            return  # nothing waits now: the next wait arms a timer again
        if deadline - self._loop.time() > _TIMER_SLACK_S:  # a later wait's: check again then
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self._deadline = 0.0
        self._fail(UpstreamTimeoutError("did not answer in time"))

    # -- request API ------------------------------------------------------------------------

    def send(
        self, head: bytes, body: bytes, *, whole: bool, timeout_s: float
    ) -> asyncio.Future[None]:
        """Write the request; the returned future completes at the end of the response
        (``whole``) or at the end of its head (streaming)."""
        self._reset()
        self._whole = whole
        waiter = self._loop.create_future()
        self._head_waiter = waiter
        self._arm(timeout_s)
        transport = self.transport
        assert transport is not None
        if len(body) <= 65536:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        return waiter

    def abort(self) -> None:
        """Drop the connection (e.g. the client went away: this aborts the generation)."""
        self.reusable = False
        self._drop_timer()
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def raise_for_error(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def reset_before_answer(self) -> bool:
        """The replica reset the connection without a byte of answer: the request was never
        read (safe to send again)."""
        return self._peer_reset and not self._got_bytes

    def body(self) -> bytes:
        body = self._body
        return body[0] if len(body) == 1 else b"".join(body)

    async def read_chunk(self, timeout_s: float) -> bytes:
        """The next piece of a streamed body (all of it that has arrived); ``b""`` at its
        end."""
        while True:
            chunks = self._chunks
            if chunks:
                # Everything that arrived since the last read, as one piece (one relay write).
                if len(chunks) == 1:
                    chunk = chunks.popleft()
                else:
                    chunk = b"".join(chunks)
                    chunks.clear()
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            waiter = self._loop.create_future()
            self._read_waiter = waiter
            self._arm(timeout_s)
            try:
                await waiter
            finally:
                self._read_waiter = None
                self._cancel_timer()

    @property
    def complete(self) -> bool:
        return self._done and self._error is None

    @property
    def ready(self) -> bool:
        """:meth:`read_chunk` would return (or raise) without waiting."""
        return bool(self._chunks) or self._done or self._error is not None

    @property
    def exhausted(self) -> bool:
        """The whole answer arrived and every piece of it was read: the next
        :meth:`read_chunk` returns ``b""``."""
        return self._done and self._error is None and not self._chunks


def _readable(transport: asyncio.Transport) -> bool:
    """An idle keep-alive connection with something to read has been closed by the server
    (EOF or reset; an HTTP server sends nothing unasked): not reusable."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return bool(select.select((sock.fileno(),), (), (), 0)[0])
    except (OSError, ValueError):
        return True


# The paths :meth:`UpstreamPool.start` posts to: the proxied generations, and vLLM's tokenizer
# endpoints (``gateway.tokenize``).
UPSTREAM_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


class UpstreamPool:
    """Keep-alive connections to one replica (``base_url``), for ``POST path`` with JSON."""

    __slots__ = (
        "_busy",
        "_closed",
        "_connect_timeout_s",
        "_heads",
        "_host",
        "_idle",
        "_keepalive_s",
        "_max_idle",
        "_port",
        "_silence",
        "_silence_timer",
        "_ssl",
    )

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 3.0,
        keepalive_s: float = 4.0,
        max_idle: int = 256,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {base_url!r}")
        self._host = parts.hostname
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._port = parts.port or (443 if self._ssl is not None else 80)
        prefix = parts.path.rstrip("/")
        host_header = parts.netloc.encode("latin-1")
        auth = f"Authorization: Bearer {api_key}\r\n".encode("latin-1") if api_key else b""
        self._heads: dict[str, bytes] = {}
        for path in UPSTREAM_PATHS:
            self._heads[path] = (
                f"POST {prefix}{path} HTTP/1.1\r\n".encode("latin-1")
                + b"Host: " + host_header + b"\r\n" + auth
                + b"Content-Type: application/json\r\nContent-Length: "
            )  # fmt: skip
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._max_idle = max_idle
        self._idle: collections.deque[UpstreamConn] = collections.deque()
        self._busy: set[UpstreamConn] = set()  # the connections with a request in progress
        self._closed = False
        # A watch of the replica's silence (:meth:`replica_silent`): the connections watched,
        # each with its read count when the watch began, and the timer that ends the watch.
        self._silence: dict[UpstreamConn, int] = {}
        self._silence_timer: asyncio.TimerHandle | None = None

    async def _connect(self) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConn(loop), self._host, self._port, ssl=self._ssl
                )
        # No address in the message: the gateway's clients see it (the proxy logs the URL).
        except TimeoutError as exc:
            raise UpstreamConnectError("connecting timed out") from exc
        except OSError as exc:
            # (asyncio's strerror names the address: "Connect call failed ('10.0.0.5', 8000)")
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise UpstreamConnectError(f"cannot connect: {reason}") from exc
        return proto

    def _take_idle(self) -> UpstreamConn | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first
            idle_s = now - conn.idle_since
            if (
                not conn.closed
                and idle_s < self._keepalive_s
                and conn.transport is not None
                and not conn.transport.is_closing()  # the replica's EOF is being handled
                and (idle_s < _CHECK_IDLE_AFTER_S or not _readable(conn.transport))
            ):
                return conn
            conn.abort()
        return None

    def release(self, conn: UpstreamConn) -> None:
        """Return ``conn`` after its response was fully read (else it is closed; so is every
        connection released after :meth:`close`)."""
        self._busy.discard(conn)
        if (
            conn.complete
            and conn.reusable
            and not conn.closed
            and not self._closed
            and len(self._idle) < self._max_idle
        ):
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.abort()

    async def start(
        self,
        path: str,
        body: bytes,
        *,
        whole: bool,
        timeout_s: float,
        request_id: str | None = None,
    ) -> UpstreamConn:
        """Send ``POST path`` with ``body`` (and an ``X-Request-Id: request_id`` header, if
        given: printable ASCII, the caller checked it). Returns the connection once the whole
        response (``whole=True``) or its head (``whole=False``) has arrived; the caller reads
        the rest with ``read_chunk`` and must call :meth:`release`. Raises
        ``UpstreamError``s."""
        head = self._heads[path] + str(len(body)).encode()
        if request_id is not None:
            head += b"\r\nX-Request-Id: " + request_id.encode("ascii")
        head += _HEAD_END
        busy = self._busy  # (a request waiting here is woken if the replica stops listening)
        conn = self._take_idle()
        if conn is not None:
            busy.add(conn)
            try:
                await conn.send(head, body, whole=whole, timeout_s=timeout_s)
            except BaseException:  # cancelled (the client went away): do not leave it half-used
                busy.discard(conn)
                conn.abort()
                raise
            if conn._error is None:
                return conn
            busy.discard(conn)
            if not conn.reset_before_answer:
                raise conn._error
            # A stale keep-alive connection the replica had dropped: retry on a fresh one.
        conn = await self._connect()
        busy.add(conn)
        try:
            await conn.send(head, body, whole=whole, timeout_s=timeout_s)
            conn.raise_for_error()
        except BaseException:
            busy.discard(conn)
            conn.abort()
            raise
        return conn

    def replica_stopped(self, grace_s: float) -> int:
        """The replica stopped listening (a poll could not connect): every request in progress
        here that receives nothing for ``grace_s`` from now on fails with
        :class:`ReplicaStoppedError`, its connection closed. Returns how many requests began
        that wait now (those an earlier call told are waiting already)."""
        return sum(conn.replica_stopped(grace_s) for conn in self._busy)

    def replica_silent(
        self, grace_s: float, reason: str, done: Callable[[bool, int], None] | None = None
    ) -> int:
        """The replica stopped answering its polls (``reason`` says how): watch its requests
        in progress now. If none of their connections receives a byte for ``grace_s``, each
        of those still in progress fails with :class:`ReplicaHungError` and its connection is
        closed; a byte on any of them (the replica is alive, only slow) ends the watch with
        none failed. One paused for a client that reads slowly neither spares them nor
        fails. ``done(alive, failed)`` is told how the watch ended: whether a byte arrived,
        and how many requests failed (not those that ended meanwhile, nor paused). Returns how
        many requests it watches (0: a watch is under way already, or none is in progress;
        the next call, e.g. at the next poll that times out, watches again)."""
        if self._silence_timer is not None or not self._busy:
            return 0
        self._silence = {conn: conn._reads for conn in self._busy}
        self._watch(grace_s, reason, done)
        return len(self._silence)

    def _watch(self, grace_s: float, reason: str, done: Callable[[bool, int], None] | None) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + grace_s
        self._silence_timer = loop.call_at(due, self._silence_over, due, grace_s, reason, done)

    def replica_answered(self) -> None:
        """The replica answered a poll: a watch of its silence under way ends, none failed."""
        self._end_watch()

    def _end_watch(self) -> None:
        timer, self._silence_timer = self._silence_timer, None
        if timer is not None:
            timer.cancel()
            self._silence = {}

    def _silence_over(
        self, due: float, grace_s: float, reason: str, done: Callable[[bool, int], None] | None
    ) -> None:
        self._silence_timer = None
        watched = self._silence
        # A byte read on any connection is evidence of life. One paused for a client that
        # reads slowly (not read from) is evidence neither way: it spares none, nor is it cut
        # (its client is the one not reading; a later watch judges it once it reads again).
        alive = any(conn._reads != mark for conn, mark in watched.items())
        if not alive and asyncio.get_running_loop().time() - due > _SILENCE_LATE_S:
            # The gateway's loop was blocked (uvloop runs due timers before reading the
            # sockets): bytes may be waiting unread. Watch on (the same marks) rather than judge.
            self._watch(grace_s, reason, done)
            return
        self._silence = {}
        failed = 0
        if not alive:
            why = (
                f"stopped answering ({reason}) and sent nothing on any connection for {grace_s:g} s"
            )
            busy = self._busy
            failed = sum(
                conn.fail_hung(why) for conn in watched if conn in busy and not conn._paused
            )
        if done is not None:
            done(alive, failed)

    def close(self) -> None:
        """Close the idle connections; those in use close when released (the replica left
        the pool: a reload removed or replaced it, or the gateway stops). A watch of the
        replica's silence ends."""
        self._closed = True
        self._end_watch()
        while self._idle:
            self._idle.pop().abort()
