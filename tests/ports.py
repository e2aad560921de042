"""Loopback ports for the tests."""

from __future__ import annotations

import socket


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then closed): for a server to be started on,
    or for a connection to be refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
