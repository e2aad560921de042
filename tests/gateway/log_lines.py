"""The gateway's log lines as the tests pick them out of ``caplog``."""

from __future__ import annotations

import logging

import pytest

PROXY_LOG = "loragate.gateway.proxy"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The proxy's access-log lines (DEBUG, with ``status=``)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == PROXY_LOG and r.levelno == logging.DEBUG and " status=" in r.getMessage()
    ]


def same_server_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings that replicas' URLs resolve to the same server."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "resolve to the same server" in r.getMessage()
    ]
