"""The time a client has to send a complete request head (``limits.client_header_timeout_s``).

aiohttp closes a connection waiting for a request only after its keep-alive timeout (an
hour by default), and its body timeout is the gateway's own (``request_body``): a connection
that sends part of a request head (``GET /health HTTP/1.1\\r\\nHost: x\\r\\n`` without the blank
line, byte by byte or not at all) or nothing at all held its socket and its task for that
long; a few thousand of them exhaust the gateway's file descriptors (slowloris).

As nginx's ``client_header_timeout``: the deadline runs from the moment the connection is
made and, on a keep-alive connection, from the first byte of each later request head (an idle
keep-alive connection is not limited by it: a load balancer in front keeps its idle
connections to the gateway open for its own idle timeout, and a gateway closing them first
would make it answer a request it sends on one just then with a 502). It ends when aiohttp's
parser has the whole head. At the deadline the connection is closed without an answer, logged
at DEBUG and counted in ``/metrics`` (``loragate_client_header_timeouts_total``).

What is left: the rest of a request head pipelined behind a request being answered (its first
bytes arrived while that request ran) is not timed; aiohttp's keep-alive timeout closes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class _Connection(Protocol):
    def force_close(self) -> None: ...


class HeadDeadlines:
    """The connections of one server that owe a request head, each with its timer.

    ``timeout_s`` is read when a deadline starts (a config reload applies to the deadlines
    that start after it); ``on_timeout`` is called for every connection closed at its
    deadline."""

    def __init__(
        self,
        timeout_s: Callable[[], float],
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._timers: dict[_Connection, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._timers)

    def start(self, conn: _Connection, peer: object) -> None:
        """The connection owes a head from now on (no-op if its deadline runs already)."""
        if conn in self._timers:
            return
        timeout_s = self._timeout_s()
        self._timers[conn] = asyncio.get_running_loop().call_later(
            timeout_s, self._expired, conn, peer, timeout_s
        )

    def stop(self, conn: _Connection) -> None:
        """The connection sent its head, or closed."""
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, conn: _Connection, peer: object, timeout_s: float) -> None:
        self._timers.pop(conn, None)
        log.debug(
            "closed the connection from %s: no complete request head within %g s "
            "(limits.client_header_timeout_s)",
            peer,
            timeout_s,
        )
        conn.force_close()
        if self._on_timeout is not None:
            self._on_timeout()
