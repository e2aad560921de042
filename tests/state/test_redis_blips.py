"""A Redis slow for a moment is a blip, not an outage: no "Redis unreachable" WARNING.

A call that times out still turns the store degraded at once (no request waits on Redis
again), but a timeout alone does not tell an outage: Redis may be slow for a moment, or our own
event loop held up past the deadline on a saturated host (a 27-minute soak at load 5-9 logged
"Redis unreachable ... no answer within 0.5 s" then "Redis reachable again" 0.14 s later, with
no Redis fault, and counted it as a resync). Redis answering again within
``outage_warning_s`` is logged at INFO and counted in ``blips``; a refused connection (Redis
stopped) is an outage at once, and a timeout lasting ``outage_warning_s`` becomes one.

Against a real redis-server made slow with ``CLIENT PAUSE`` from another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from loragate.state.keys import KeySpace
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore, run_maintenance
from loragate.state.store import ReplicaRecord
from redis_fixture import RedisServer

OP_TIMEOUT_S = 0.2


@contextlib.asynccontextmanager
async def _maintained(redis_server: RedisServer) -> AsyncIterator[ResilientStore]:
    """A started store on the wall clock with its maintenance loop running."""
    remote = RedisStore.from_url(
        redis_server.url,
        keys=KeySpace(prefix=f"b{uuid.uuid4().hex[:8]}:"),
        op_timeout_s=OP_TIMEOUT_S,
    )
    store = ResilientStore(remote, jitter=0.0)
    await store.start()
    assert not store.degraded
    await store.upsert_replica(ReplicaRecord(replica_id="r1", url="http://r1"))
    task = asyncio.create_task(run_maintenance(store, interval_s=0.02))
    try:
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


async def _until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _pause(redis_server: RedisServer, ms: int) -> None:
    """Redis holds every client's commands for ``ms`` (as a slow script or fork would)."""
    other = aioredis.Redis.from_url(redis_server.url)
    try:
        await other.execute_command("CLIENT", "PAUSE", ms, "ALL")
    finally:
        await other.aclose()


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_redis_slow_for_a_moment_is_a_blip_and_a_stop_is_an_outage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.state")
    async with _maintained(redis_server) as store:
        await _pause(redis_server, 700)
        await store.begin_request("r1", "lora-0", "q1", 1.0)  # times out: no answer in 0.2 s
        assert store.degraded  # routing goes to the local view at once
        await _until(lambda: not store.degraded)  # answered again after the pause
        assert (store.blips, store.recoveries) == (1, 0)
        assert store.error_count >= 1
        assert _lines(caplog, "Redis unreachable") == []
        (slow,) = _lines(caplog, "Redis slow for")
        assert slow.levelno == logging.INFO
        assert "TimeoutError: no answer within 0.2 s" in slow.getMessage()
        assert "(no outage: it answered again within state.outage_warning_s, 2 s)" in (
            slow.getMessage()
        )
        assert _lines(caplog, "reachable again") == []

        # A stopped Redis (connection refused) is an outage at once, as before.
        await asyncio.to_thread(redis_server.stop)
        await store.begin_request("r1", "lora-0", "q2", 2.0)
        assert store.degraded
        (down,) = _lines(caplog, "Redis unreachable")
        assert down.levelno == logging.WARNING
        assert "TimeoutError" not in down.getMessage()
        await asyncio.to_thread(redis_server.start)
        await _until(lambda: not store.degraded)
        assert (store.blips, store.recoveries) == (1, 1)
        assert len(_lines(caplog, "Redis unreachable")) == 1
        (back,) = _lines(caplog, "Redis reachable again")
        assert back.levelno == logging.WARNING


async def test_a_timeout_that_lasts_is_an_outage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.state")
    async with _maintained(redis_server) as store:
        await _pause(redis_server, 3500)
        await store.begin_request("r1", "lora-0", "q1", 1.0)
        assert store.degraded
        assert _lines(caplog, "Redis unreachable") == []  # not yet: maybe a blip
        await _until(lambda: bool(_lines(caplog, "Redis unreachable")))
        (down,) = _lines(caplog, "Redis unreachable")
        assert down.levelno == logging.WARNING
        lasted = re.match(r"state: Redis unreachable for ([0-9.]+) s \(", down.getMessage())
        assert lasted is not None and float(lasted[1]) >= 2.0, down.getMessage()
        assert "TimeoutError: no answer within 0.2 s" in down.getMessage()
        assert store.degraded
        await _until(lambda: not store.degraded)
        assert (store.blips, store.recoveries) == (0, 1)
        assert len(_lines(caplog, "Redis reachable again")) == 1
        assert _lines(caplog, "Redis slow for") == []
