"""Drained replicas in the state store (``set_drain`` / ``clear_drain``, ``StateView.drains``):
the same behaviour from MemoryStore, RedisStore and ResilientStore, kept in Redis across
instances and written back after Redis lost its data. Against a real redis-server."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from store_kinds import STORE_KINDS, store_of_kind

from loragate.core.clock import VirtualClock
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import ReplicaRecord, StateStore
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    async with store_of_kind(request) as made:
        yield made


async def test_set_and_clear_are_idempotent_and_keep_the_first_time(store: StateStore) -> None:
    for rid in ("r0", "r1"):
        await store.upsert_replica(ReplicaRecord(replica_id=rid, url=f"http://{rid}"))
    version = (await store.snapshot()).version
    assert (await store.snapshot()).drains == {}
    assert await store.set_drain("r0", 100.5) is True
    assert await store.set_drain("r0", 200.0) is False  # drained already: kept as it was
    assert await store.set_drain("r1", 300.0) is True
    view = await store.snapshot()
    assert dict(view.drains) == {"r0": 100.5, "r1": 300.0}
    assert view.version == version  # routing state, not a config change
    assert await store.clear_drain("r1") is True
    assert await store.clear_drain("r1") is False
    assert dict((await store.snapshot()).drains) == {"r0": 100.5}
    # A replica that leaves the registry leaves its drain behind.
    await store.remove_replica("r0")
    assert dict((await store.snapshot()).drains) == {}


async def test_a_drain_is_seen_by_another_instance_and_by_one_started_later(
    redis_stores: StoreFactory,
) -> None:
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="a"), clock=clock)
    b = ResilientStore(redis_stores(instance_id="b"), clock=clock)
    for s in (a, b):
        await s.start()
    await a.upsert_replica(ReplicaRecord(replica_id="r0", url="http://r0"))
    await a.set_drain("r0", 5.0)
    assert dict(a.drains()) == {"r0": 5.0}  # in A's view at once
    assert dict(b.drains()) == {}
    clock.advance_by(1.0)
    await b.maintain()  # B's refresh
    assert dict(b.drains()) == {"r0": 5.0}
    later = ResilientStore(redis_stores(instance_id="c"), clock=clock)
    await later.start()  # a gateway (re)started: the drain is in Redis
    assert dict(later.drains()) == {"r0": 5.0}
    await b.clear_drain("r0")
    clock.advance_by(1.0)
    await a.maintain()
    assert dict(a.drains()) == {}


async def test_a_refresh_racing_our_drain_writes_does_not_undo_them(
    redis_stores: StoreFactory,
) -> None:
    """A refresh whose snapshot Redis answers before our drain write lands must keep the
    mirror's drains (else routing here would ignore a drain just answered 200)."""
    a = ResilientStore(redis_stores(instance_id="a"))
    await a.start()
    await a.upsert_replica(ReplicaRecord(replica_id="r0", url="http://r0"))
    for i in range(20):
        refresh = asyncio.ensure_future(a._refresh())
        await asyncio.sleep(0)  # the refresh is under way
        if i % 2 == 0:
            await a.set_drain("r0", float(i))
            expected = {"r0": float(i)}
        else:
            await a.clear_drain("r0")
            expected = {}
        await refresh
        assert dict(a.drains()) == expected, i


async def test_drains_are_written_back_after_redis_lost_its_data(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    gw = ResilientStore(redis_stores(instance_id="a"), clock=clock)
    await gw.start()
    await gw.upsert_replica(ReplicaRecord(replica_id="r0", url="http://r0"))
    await gw.set_drain("r0", 7.25)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()  # an operator wipes Redis: no connection error at all
    finally:
        await client.aclose()
    clock.advance_by(1.0)
    await gw.maintain()  # the refresh sees the epoch gone and pushes its view back
    assert not gw.degraded
    assert dict((await redis_stores().snapshot()).drains) == {"r0": 7.25}


@pytest.mark.parametrize("redis_keeps_its_data", [True, False], ids=["kept", "lost"])
async def test_drain_writes_made_while_redis_is_down_reach_it_when_it_returns(
    redis_server: RedisServer, redis_stores: StoreFactory, redis_keeps_its_data: bool
) -> None:
    """The gateway refuses drain writes while degraded (503), but one can fail halfway (Redis
    went away during it): it stays in the mirror and the journal, and reaches Redis with the
    resync, as does an undrain; the other instance then sees them."""
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="a"), clock=clock)
    b = ResilientStore(redis_stores(instance_id="b"), clock=clock)
    for s in (a, b):
        await s.start()
    for rid in ("r0", "r1"):
        await a.upsert_replica(ReplicaRecord(replica_id=rid, url=f"http://{rid}"))
    await a.set_drain("r1", 1.0)
    redis_server.stop(save=redis_keeps_its_data)
    await a.set_drain("r0", 2.0)
    await a.clear_drain("r1")
    assert a.degraded and a.journal_len > 0
    assert dict(a.drains()) == {"r0": 2.0}
    redis_server.start()
    for _ in range(20):  # B notices the outage at its first call, then both resync
        clock.advance_by(10.0)
        for s in (a, b):
            await s.maintain()
        if not (a.degraded or b.degraded):
            break
    assert (a.recoveries, b.recoveries) == (1, 1)
    clock.advance_by(1.0)
    await b.maintain()  # a refresh after both resyncs
    assert dict((await redis_stores().snapshot()).drains) == {"r0": 2.0}
    assert dict(b.drains()) == {"r0": 2.0}


async def test_each_instance_s_last_read_is_shared_and_a_closed_or_stale_one_leaves(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    """``P readers``: each refresh of a ResilientStore records its instance's read, timed by
    Redis's clock as a drain Redis times is (what tells which instances have not seen a
    drain, without clock skew); a probe's snapshot is not recorded; an instance that closes
    removes its entry, and one past ``reader_ttl_s`` is dropped by the next read."""
    a = ResilientStore(redis_stores(instance_id="a"))
    b = ResilientStore(redis_stores(instance_id="b"))
    for s in (a, b):
        await s.start()  # the first sync is a read
    assert await a.set_drain("r0") is True  # timed by Redis, after B's read
    since = a.drains()["r0"]
    await a._refresh()
    assert a.drains()["r0"] == since
    assert set(a.readers_before(since)) == {"b"}  # not itself
    await asyncio.sleep(0.002)  # Redis times both to the ms: the next read is a later ms
    await b._refresh()  # B reads the drain
    await a._refresh()
    assert a.readers_before(since) == {}
    assert set(a.readers_before(math.inf)) == {"b"}
    probe = await redis_stores(instance_id="probe").snapshot()
    assert set(probe.readers) == {"a", "b"}
    assert all(since <= t for t in probe.readers.values())
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        key = redis_stores().keys.readers
        await client.hset(key, "ghost", 1000)  # read in 1970: long past the ttl
        await b.close()
        await a._refresh()
        assert a.readers_before(math.inf) == {}
        assert set(map(bytes.decode, await client.hkeys(key))) == {"a"}
    finally:
        await client.aclose()


async def test_drains_written_back_after_redis_lost_its_data_are_named_in_a_warning(
    redis_server: RedisServer, redis_stores: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The instance that refills Redis writes back the drains it knew of, which may hold one
    ended just before the loss (its view predates the undrain): the operator is told which,
    once, by that instance; an instance with nothing to write back says nothing."""
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="a"), clock=clock)
    b = ResilientStore(redis_stores(instance_id="b"), clock=clock)
    for s in (a, b):
        await s.start()
    await a.upsert_replica(ReplicaRecord(replica_id="r0", url="http://r0"))
    await a.set_drain("r0", 1.0)
    await a.set_drain("r1", 2.0)
    clock.advance_by(1.0)
    await b.maintain()  # B's view: r0 and r1 drained
    await a.clear_drain("r1")  # A ends r1's drain; Redis loses its data before B refreshes
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    clock.advance_by(1.0)
    with caplog.at_level("WARNING", logger="loragate.state"):
        await b.maintain()  # B refills Redis first: r1 is back
        await a.maintain()
    warnings = [r.getMessage() for r in caplog.records if "wrote back the drains" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "knew of: r0, r1." in warnings[0]
    assert dict((await redis_stores().snapshot()).drains) == {"r0": 1.0, "r1": 2.0}
