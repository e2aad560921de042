"""A request that goes away while its lease's begin (the EVALSHA that ZADDs it) is in flight
has the lease's end (ZREM, ``SharedState.end``: a task of its own, on another pooled
connection) wait for that begin: were the ZREM to reach Redis first (the begin's bytes delayed
on their connection, e.g. a retransmitted segment), the late ZADD would leave an orphan lease
that every gateway instance counts in flight until this one's next lease sync
(``state.lease_renew_s``, 10 s). Before, ``bounded`` cancelled the begin at once and the ZREM
went out (real redis-server behind a relay that holds the begin's bytes)."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from loragate.state.keys import KeySpace
from loragate.state.redis_store import RedisStore
from redis_fixture import RedisServer
from tcp_relay import relay_to


async def _until(predicate: object, what: str) -> None:
    for _ in range(300):  # a hang guard, not a timing assertion
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_lease_ended_while_its_begin_is_in_flight_leaves_no_orphan(
    redis_server: RedisServer,
) -> None:
    keys = KeySpace(prefix=f"t{uuid.uuid4().hex[:8]}:")
    direct = aioredis.Redis.from_url(redis_server.url)
    async with relay_to(redis_server.port) as relay:
        store = RedisStore.from_url(
            f"redis://127.0.0.1:{relay.port}/0", keys=keys, op_timeout_s=5.0
        )
        try:
            # One pooled connection through the relay (the begin's).
            await store.begin_request("r0", None, "warm", time.time())
            await store.end_request("r0", "warm")
            gate = relay.hold()  # what that connection sends next is delayed
            ends: list[asyncio.Future[None]] = []

            async def request() -> None:
                try:
                    await store.begin_request("r0", None, "req-1", time.time())
                except asyncio.CancelledError:  # as SharedState.begin: the lease ends
                    ends.append(asyncio.ensure_future(store.end_request("r0", "req-1")))
                    raise

            task = asyncio.ensure_future(request())
            await _until(lambda: relay.held == 1, "the begin's bytes to be held")
            task.cancel()  # the client went away while the begin was in flight
            await asyncio.gather(task, return_exceptions=True)
            (end,) = ends
            # The end goes on (its ZREM on another connection, not held); the begin's bytes
            # arrive a little later.
            asyncio.get_running_loop().call_later(0.3, gate.set)
            await asyncio.wait_for(end, timeout=30)
            await _until(lambda: relay.forwarded_held == 1, "the begin's bytes to arrive")
            assert await direct.ping()  # (after them: Redis has run them)
            leases = await direct.zrange(keys.in_flight("r0"), 0, -1)
        finally:
            await store.close()
            await direct.aclose()
    assert leases == []
