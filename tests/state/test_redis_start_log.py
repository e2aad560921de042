"""A gateway started while Redis is unreachable says where it looked and what failed, the
password left out (before: "Redis unreachable at start-up", no URL, no error); so does one
whose Redis goes away while it serves (before: the error, no URL), and the line when Redis is
back names it too."""

from __future__ import annotations

import logging
import socket

import pytest
import redis.asyncio as aioredis

from loragate.core.clock import VirtualClock
from loragate.state.redis_store import RedisStore, redacted_url
from loragate.state.resilient import ResilientStore
from redis_fixture import RedisServer


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


async def _require_password(server: RedisServer) -> None:
    """The real redis-server asks clients for a password from now on (until it restarts)."""
    admin = aioredis.from_url(server.url)
    try:
        await admin.config_set("requirepass", "pa55word")
    finally:
        await admin.aclose()


async def test_redis_lost_while_serving_names_the_url_without_its_password_and_the_error(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await _require_password(redis_server)
    port = redis_server.port
    remote = RedisStore.from_url(f"redis://:pa55word@127.0.0.1:{port}/0", op_timeout_s=0.5)
    store = ResilientStore(remote, clock=VirtualClock(), jitter=0.0)
    caplog.set_level(logging.WARNING, logger="loragate.state")
    try:
        await store.start()
        assert not store.degraded
        redis_server.stop()
        await store.begin_request("r0", "lora-0", "q1", 0.0)  # the write that finds it gone
        assert store.degraded
    finally:
        await store.close()
    (message,) = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert message.startswith(
        f"state: Redis unreachable (redis://:***@127.0.0.1:{port}/0: redis: "  # and the error
    )
    assert message.endswith("), serving from the local view until it is reachable")
    assert "pa55word" not in caplog.text


async def test_redis_back_names_the_url_without_its_password(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url.replace("redis://", "redis://:pa55word@")
    await _require_password(redis_server)
    clock = VirtualClock()
    store = ResilientStore(RedisStore.from_url(url, op_timeout_s=0.5), clock=clock, jitter=0.0)
    caplog.set_level(logging.WARNING, logger="loragate.state")
    try:
        await store.start()
        redis_server.stop()
        await store.begin_request("r0", "lora-0", "q1", 0.0)
        assert store.degraded
        redis_server.start()
        await _require_password(redis_server)
        clock.advance_by(10.0)  # past the retry's backoff
        await store.maintain()
    finally:
        await store.close()
    assert not store.degraded
    shown = redis_server.url.replace("redis://", "redis://:***@")
    assert f"state: Redis reachable again ({shown}), resynchronised" in caplog.text
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
