"""The adapter registry across a Redis restart, on a real redis-server.

* Redis comes back empty: each instance writes its view back (``push_missing``), and the
  tombstones it knows go with it (with the time they have left), so an instance whose view
  predates a deletion does not bring the deleted adapter back, whichever instance is back
  first; a registration made after the restart is newer than the deletion and stays.
* Right after a resync that raced traffic (writes still queued), admin registry writes are
  decided by Redis, after the queued writes, not by the local mirror; and after Redis lost its
  data unnoticed (no failed call), not by the empty Redis before this instance's view is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from loragate.core.clock import VirtualClock
from loragate.core.types import AdapterSpec, ReplicaSettings
from loragate.state.keys import Ttls
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import ReplicaRecord
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]
SETTINGS = ReplicaSettings(max_loras=2, max_cpu_loras=4)
TTLS = Ttls(tombstone_ttl_s=30.0)
X = AdapterSpec(name="x", path="/a/x", rank=8)


async def _started(factory: StoreFactory, clock: VirtualClock, name: str) -> ResilientStore:
    store = ResilientStore(factory(instance_id=name, ttls=TTLS), clock=clock, jitter=0.0)
    await store.start()
    assert not store.degraded
    return store


async def _recover(store: ResilientStore, clock: VirtualClock) -> None:
    """Drive maintenance (bounded) until the store is back in sync."""
    for _ in range(20):
        clock.advance_by(6.0)  # past any backoff (retry_max_s 5 s)
        await store.maintain()
        if not store.degraded:
            return
    raise AssertionError(f"store did not recover (errors={store.error_count})")


async def _outage(redis_server: RedisServer, *stores: ResilientStore) -> None:
    """Redis restarts with its data lost; each store notices on its next write."""
    redis_server.stop()
    for i, store in enumerate(stores):
        await store.begin_request("r1", None, f"outage-{i}", 0.0)
        assert store.degraded
    redis_server.start()


@pytest.mark.parametrize("first", ["deleter", "stale"])
async def test_a_deletion_survives_redis_losing_its_data(
    redis_server: RedisServer, redis_stores: StoreFactory, first: str
) -> None:
    clock = VirtualClock()
    deleter = await _started(redis_stores, clock, "gw-a")
    stale = await _started(redis_stores, clock, "gw-b")
    await deleter.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    assert await deleter.put_adapter(X)
    await deleter.put_adapter(AdapterSpec(name="keep", path="/a/keep"))
    clock.advance_by(1.0)
    await stale.maintain()
    assert "x" in stale.view().adapters
    # The deletion; the other instance has not refreshed since (its view still holds "x").
    assert await deleter.delete_adapter("x")
    assert "x" in stale.view().adapters

    await _outage(redis_server, deleter, stale)
    order = (deleter, stale) if first == "deleter" else (stale, deleter)
    for store in order:
        await _recover(store, clock)

    raw = await redis_stores().snapshot()
    assert set(raw.adapters) == {"keep"}  # not brought back by the stale view
    assert set(raw.tombstones) == {"x"}  # written back, with the time it had left
    # (at least one recovery step, 6 s on the clock, passed before it was written back)
    assert 0 < raw.tombstones["x"] <= TTLS.tombstone_ttl_s - 6.0 + 0.5
    clock.advance_by(1.0)
    for store in (deleter, stale):
        await store.maintain()
        assert set(store.view().adapters) == {"keep"}
        assert set(store.tombstones()) == {"x"}  # every poller still unloads it


async def test_a_registration_after_the_restart_beats_an_older_tombstone(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    deleter = await _started(redis_stores, clock, "gw-a")
    await deleter.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    assert await deleter.put_adapter(X)
    assert await deleter.delete_adapter("x")
    await _outage(redis_server, deleter)
    # Another instance, back first, registers "x" anew (after the deletion) ...
    other = redis_stores(instance_id="gw-c", ttls=TTLS)
    again = AdapterSpec(name="x", path="/a/x-again", rank=16)
    assert await other.put_adapter(again)
    # ... then the deleter comes back: its tombstone is older than that registration.
    await _recover(deleter, clock)
    raw = await redis_stores().snapshot()
    assert raw.adapters == {"x": again}
    assert raw.tombstones == {}
    assert deleter.view().adapters == {"x": again}


async def test_a_tombstone_removes_what_a_stale_push_wrote_back_but_not_a_later_put(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    """The stale view comes back first and writes "x" back; the deleter's tombstone, written
    back next, removes it; once deleted that way, a registration of "x" is accepted and a
    second stale push (another instance) does not undo it."""
    clock = VirtualClock()
    deleter = await _started(redis_stores, clock, "gw-a")
    stale = await _started(redis_stores, clock, "gw-b")
    await deleter.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    assert await deleter.put_adapter(X)
    clock.advance_by(1.0)
    await stale.maintain()
    assert await deleter.delete_adapter("x")
    await _outage(redis_server, deleter, stale)
    await _recover(stale, clock)
    assert "x" in (await redis_stores().snapshot()).adapters  # written back by the stale view
    await _recover(deleter, clock)
    assert "x" not in (await redis_stores().snapshot()).adapters
    # The operator registers it again: that registration is newer than the tombstone.
    assert await deleter.put_adapter(AdapterSpec(name="x", path="/a/x2"))
    raw = await redis_stores().snapshot()
    assert raw.adapters["x"].path == "/a/x2"
    assert raw.tombstones == {}


async def _resync_racing_traffic(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> tuple[ResilientStore, VirtualClock]:
    """A store back from an outage whose resync raced traffic: not degraded, writes still
    queued (as in test_redis_faults.test_resync_ends_while_leases_change_during_every_sync)."""
    clock = VirtualClock()
    gw = ResilientStore(
        redis_stores(instance_id="gw-churn"), clock=clock, jitter=0.0, journal_max=200
    )
    await gw.start()
    await gw.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    redis_server.stop()
    await gw.begin_request("r1", "lora-0", "down-0", 1.0)
    assert gw.degraded
    redis_server.start()
    stop = asyncio.Event()

    async def churn() -> None:
        i = 0
        while not stop.is_set():
            await gw.begin_request("r1", f"lora-{i % 3}", f"churn-{i}", 2.0)
            await asyncio.sleep(0)
            await gw.end_request("r1", f"churn-{i}")
            i += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(churn())
    try:
        await asyncio.sleep(0)
        await asyncio.wait_for(_recover(gw, clock), timeout=60)  # a hang guard
    finally:
        stop.set()
        await task
    assert not gw.degraded
    assert gw.journal_len > 0
    return gw, clock


async def test_registry_writes_after_a_racing_resync_are_decided_by_redis(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    gw, _ = await _resync_racing_traffic(redis_server, redis_stores)
    # Another instance registers two names; this one's mirror has not seen them.
    other = redis_stores(instance_id="gw-other")
    taken = AdapterSpec(name="taken", path="/a/taken")
    assert await other.put_adapter(taken)
    assert await other.put_adapter(AdapterSpec(name="gone", path="/a/gone"))
    assert "taken" not in gw.view().adapters
    # Redis decides, after the writes still queued: "taken" is held (409), "gone" existed.
    assert not await gw.put_adapter(AdapterSpec(name="taken", path="/a/mine"))
    assert await gw.delete_adapter("gone")
    assert await gw.put_adapter(AdapterSpec(name="fresh", path="/a/fresh"))
    assert gw.journal_len == 0  # the queued writes went first
    raw = await redis_stores().snapshot()
    assert raw.adapters["taken"] == taken  # the first registration stands
    assert set(raw.adapters) == {"taken", "fresh"}
    assert set(raw.tombstones) == {"gone"}
    assert set(gw.view().adapters) >= {"fresh"} and "gone" not in gw.view().adapters
    assert "gone" in gw.tombstones()
    assert raw.residency_of("r1").gpu  # the queued touches reached Redis


async def test_registry_writes_after_an_unnoticed_data_loss_see_the_refilled_redis(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    gw = await _started(redis_stores, clock, "gw-a")
    await gw.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    assert await gw.put_adapter(X)
    assert await gw.put_adapter(AdapterSpec(name="y", path="/a/y"))
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()  # no connection error: the store has not noticed
    finally:
        await client.aclose()
    # Before any refresh: "x" is registered (this instance's view, which a resync writes back),
    # so a registration of the name is refused, and "y" exists to be deleted.
    assert not await gw.put_adapter(AdapterSpec(name="x", path="/a/other"))
    assert await gw.delete_adapter("y")
    assert not gw.degraded
    raw = await redis_stores().snapshot()
    assert raw.adapters == {"x": X}
    assert set(raw.tombstones) == {"y"}
    assert set(raw.replicas) == {"r1"}  # the rest of the view is back too
