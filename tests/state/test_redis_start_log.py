"""A gateway started while Redis is unreachable says where it looked and what failed, the
password left out (before: "Redis unreachable at start-up", no URL, no error)."""

from __future__ import annotations

import logging
import socket

import pytest

from loragate.core.clock import VirtualClock
from loragate.state.redis_store import RedisStore, redacted_url
from loragate.state.resilient import ResilientStore


async def test_redis_down_at_start_names_the_url_without_its_password_and_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = RedisStore.from_url(f"redis://:pa55word@127.0.0.1:{port}/0", op_timeout_s=0.5)
    store = ResilientStore(remote, clock=VirtualClock(), jitter=0.0)
    caplog.set_level(logging.WARNING, logger="loragate.state")
    try:
        await store.start()
        assert store.degraded
    finally:
        await store.close()
    (message,) = [r.getMessage() for r in caplog.records if "at start-up" in r.getMessage()]
    assert message.startswith(
        f"state: Redis unreachable at start-up (redis://:***@127.0.0.1:{port}/0: redis: "
        "ConnectionError: "  # and the error
    )
    assert "pa55word" not in caplog.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@h:6380/2", "redis://:***@h:6380/2"),
        ("rediss://user:p%40ss@h/0", "rediss://user:***@h/0"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),  # a user name alone is no secret
        ("unix:///run/redis.sock?db=3&password=s3cret", "unix:///run/redis.sock?db=3&password=***"),
        ("redis://:a@b@h:1?password=c", "redis://:***@h:1?password=***"),
    ],
)
def test_a_redis_url_in_a_log_leaves_the_password_out(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
