"""What becomes of a gateway's client connections when it stops listening (the shutdown's
drain, ``runner``): every connection the kernel accepted gets an HTTP answer to the request it
sends, rather than a reset.

* :func:`accept_waiting`: the connections the kernel completed but the event loop has not
  accepted yet (the listen backlog) are accepted just before the listening socket closes (a
  listener closed with connections in its backlog resets them: clients that already sent their
  request see ``ECONNRESET``); :func:`adopt` hands them to the aiohttp server like any other.
* :class:`ConnectionKeeper`: a connection waiting for a request closes after a grace period,
  counted from the listener's close or from the end of its last answer (a client whose event
  loop has not seen the close yet would reuse the connection; one answered with keep-alive
  before the shutdown began is reused at once), and never while a request's bytes wait unread
  in the kernel (closing a socket with unread data sends a reset): requests that arrive
  meanwhile are served, their answers saying ``Connection: close`` (``runner``). A connection
  that has not sent its first request yet (just accepted) gets its own grace to send it.

What is left: a request whose bytes reach the gateway just after its idle connection closed at
the grace's end (or whose head arrives in pieces across it) is lost (the client sees the
connection close), as with any HTTP/1.1 server closing an idle connection.

aiohttp internals used (checked against aiohttp 3.14): a ``web.RequestHandler`` waiting for a
request has a pending ``_waiter`` future (aiohttp's own keep-alive timer tests the same), and
``_request_count`` counts the requests received on the connection. tests/gateway/
test_shutdown_connections.py fails if they change.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import socket
import termios
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

_SETTLE_POLL_S = 0.01


@dataclass(slots=True)
class ConnectionCounts:
    """What the shutdown did with the client connections (the drain's log line)."""

    backlog: int = 0  # accepted from the listen backlog as the listener closed
    idle_closed: int = 0  # idle keep-alive connections closed
    silent_closed: int = 0  # closed after sending no request within the grace period
    late_requests: int = 0  # requests received after the listener closed (served)
    requests_before: int = 0  # the server's request count when the listener closed

    def describe(self) -> str:
        parts = [
            f"{_n(self.late_requests, 'request')} received after the listener closed (served)",
            f"{_n(self.backlog, 'connection')} taken from the listen backlog",
            f"{self.idle_closed} idle closed",
        ]
        if self.silent_closed:
            parts.append(f"{self.silent_closed} closed without sending a request")
        return "; ".join(parts)


def _n(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def accept_waiting(sock: socket.socket, limit: int) -> list[socket.socket]:
    """Accept (up to ``limit``) the connections waiting in the backlog of the non-blocking
    listening socket ``sock``. Call it right before the socket closes, with no ``await`` in
    between: a connection completed after the last accept is reset by the close."""
    accepted: list[socket.socket] = []
    while len(accepted) < limit:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            break
        except ConnectionAbortedError:
            continue  # the client gave up meanwhile
        except OSError as exc:  # e.g. out of file descriptors: the rest are reset
            log.warning("shutdown: cannot accept the connections waiting to be accepted: %s", exc)
            break
        accepted.append(conn)
    return accepted


async def adopt(server: web.Server, conns: list[socket.socket]) -> int:
    """Serve ``conns`` (accepted by :func:`accept_waiting`) as the listener would have; returns
    how many were taken."""
    loop = asyncio.get_running_loop()
    taken = 0
    for conn in conns:
        try:
            conn.setblocking(False)
            await loop.connect_accepted_socket(server, conn)
        except OSError as exc:
            log.warning("shutdown: cannot serve a connection taken from the backlog: %s", exc)
            conn.close()
            continue
        taken += 1
    return taken


def unread_bytes(transport: Any) -> int:
    """Bytes received on ``transport``'s socket that the event loop has not read yet (0 if
    unknown)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf, True)
    except (OSError, ValueError):
        return 0
    return buf[0]


def _waiting_for_request(conn: web.RequestHandler) -> bool:
    """The connection's request loop waits for a request (nothing received but, maybe, part
    of one); False while it handles one or has not started yet."""
    waiter: asyncio.Future[None] | None = conn._waiter
    return waiter is not None and not waiter.done()


class ConnectionKeeper:
    """Closes ``server``'s connections as the shutdown goes on, from the listener's close
    (:meth:`run`, until every connection is closed or the task is cancelled): a connection
    waiting for a request closes once it has waited ``idle_grace_s`` (counted from the
    listener's close, or from the end of its last answer: one answered with keep-alive before
    the shutdown began goes back to waiting, and its client may reuse it at once) and nothing
    waits unread on it; one that never sent a request closes after ``first_request_grace_s``.
    A request that arrives meanwhile is served (its answer says ``Connection: close``). Nothing
    is awaited between a connection's check and its close."""

    def __init__(
        self,
        server: web.Server,
        *,
        idle_grace_s: float,
        first_request_grace_s: float,
        counts: ConnectionCounts,
    ) -> None:
        self._server = server
        self._idle_grace_s = idle_grace_s
        self._first_request_grace_s = first_request_grace_s
        self._counts = counts
        self._start = asyncio.get_running_loop().time()
        self._busy_at: dict[web.RequestHandler, float] = {}

    def close_waiting(self) -> int:
        """One pass: close the connections whose grace is over; returns how many are open."""
        now = asyncio.get_running_loop().time()
        busy_at: dict[web.RequestHandler, float] = {}  # when each was last seen busy
        for conn in self._server.connections:
            if conn.transport is None:
                continue
            if not _waiting_for_request(conn) or unread_bytes(conn.transport):
                busy_at[conn] = now  # busy, starting, or a request arriving: wait
                continue
            since = self._busy_at.get(conn, self._start)
            fresh = conn._request_count == 0
            if now - since < (self._first_request_grace_s if fresh else self._idle_grace_s):
                busy_at[conn] = since
                continue
            conn.force_close()
            if fresh:
                self._counts.silent_closed += 1
            else:
                self._counts.idle_closed += 1
        self._busy_at = busy_at
        return len(busy_at)

    async def run(self) -> None:
        if self._idle_grace_s <= 0:
            # No grace: a connection busy with an answer closes right after it (aiohttp's
            # own ``close``), as its client reads the answer's end, not a moment later.
            for conn in self._server.connections:
                if conn._request_count and not _waiting_for_request(conn):
                    conn.close()
        while True:
            await asyncio.sleep(0)  # the reads the loop was told of run (or show in FIONREAD)
            if not self.close_waiting():
                return  # every connection closed
            await asyncio.sleep(_SETTLE_POLL_S)
