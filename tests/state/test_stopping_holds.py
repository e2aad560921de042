"""Holds of replicas shutting down in the state store (``hold_stopping`` / ``release_stopping``,
``StateView.stopping``): the same behaviour from MemoryStore, RedisStore and ResilientStore,
shared by instances on one real redis-server through their refresh (no extra round trip),
lapsing on their own (a crashed instance leaves nothing behind), kept through Redis outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from store_kinds import STORE_KINDS, store_of_kind

from loragate.core.clock import VirtualClock
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import StateStore, StoppingMap
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]

DRAIN_500 = "answering (http://r0): cannot schedule new futures after shutdown"


def _plain(holds: StoppingMap) -> dict[str, str]:
    return {rid: h.error for rid, h in holds.items()}


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    async with store_of_kind(request) as made:
        yield made


async def test_hold_replace_and_release(store: StateStore) -> None:
    version = (await store.snapshot()).version
    assert (await store.snapshot()).stopping == {}
    await store.hold_stopping("r0", error=DRAIN_500, ttl_s=30.0)
    await store.hold_stopping("r|1 ü", error="Server shutting down", ttl_s=30.0)
    view = await store.snapshot()
    assert _plain(view.stopping) == {"r0": DRAIN_500, "r|1 ü": "Server shutting down"}
    assert all(0 < h.left_s <= 30.0 for h in view.stopping.values())
    # A new hold of the same replica replaces the old one (its error and its lifetime).
    await store.hold_stopping("r0", error="again", ttl_s=600.0)
    view = await store.snapshot()
    assert view.stopping["r0"].error == "again" and 30.0 < view.stopping["r0"].left_s <= 600.0
    assert view.version == version  # routing state, not a config change
    await store.release_stopping("r0")
    await store.release_stopping("r9")  # unknown: no-op
    assert _plain((await store.snapshot()).stopping) == {"r|1 ü": "Server shutting down"}
    await store.hold_stopping("r|1 ü", error="x", ttl_s=0.0)  # 0: released
    assert (await store.snapshot()).stopping == {}


async def test_memory_holds_lapse_on_its_clock() -> None:
    clock = VirtualClock(100.0)
    store = MemoryStore(clock=clock)
    await store.hold_stopping("r0", error=DRAIN_500, ttl_s=30.0)
    clock.advance_by(29.5)
    assert store.stopping()["r0"].left_s == pytest.approx(0.5)
    assert _plain(store.view().stopping) == {"r0": DRAIN_500}
    clock.advance_by(0.5)
    assert store.stopping() == {}


async def test_redis_holds_lapse_on_the_server_clock_and_leave_no_key(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    # An instance that holds a replica and crashes: nothing of it outlives the hold's TTL.
    store = redis_stores()
    await store.hold_stopping("short", error=DRAIN_500, ttl_s=0.2)
    await store.hold_stopping("long", error=DRAIN_500, ttl_s=60.0)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = store.keys.stopping
        assert key.startswith(store.keys.prefix)
        assert 59_000 < await raw.pttl(key) <= 60_000  # as long as its longest-lived entry
        for _ in range(200):  # bounded wait for the server clock to pass 0.2 s
            if "short" not in (await store.snapshot()).stopping:
                break
            await asyncio.sleep(0.02)
        assert _plain((await store.snapshot()).stopping) == {"long": DRAIN_500}
        assert await raw.hlen(key) == 1  # the snapshot deleted the lapsed entry
        await store.release_stopping("long")
        assert await raw.exists(key) == 0
        await store.hold_stopping("r0", error=DRAIN_500, ttl_s=0.2)
        for _ in range(200):  # no reader at all: the key expires by itself
            if not await raw.exists(key):
                break
            await asyncio.sleep(0.02)
        assert await raw.exists(key) == 0
    finally:
        await raw.aclose()


async def test_instances_share_holds_through_their_refresh(redis_stores: StoreFactory) -> None:
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="gw-a"), clock=clock)
    b = ResilientStore(redis_stores(instance_id="gw-b"), clock=clock)
    await a.start()
    await b.start()
    await a.hold_stopping("r0", error=DRAIN_500, ttl_s=30.0)
    assert _plain(a.stopping()) == {"r0": DRAIN_500}  # at once, locally
    assert b.stopping() == {}  # until b's next refresh: no Redis call per read
    clock.advance_by(1.0)
    await b.maintain()
    assert _plain(b.stopping()) == {"r0": DRAIN_500}
    assert 0 < b.stopping()["r0"].left_s <= 30.0
    assert _plain(b.view().stopping) == _plain(b.stopping())
    # Released by b (its poll found the replica gone): a takes it up at its refresh.
    await b.release_stopping("r0")
    assert b.stopping() == {}
    clock.advance_by(1.0)
    await a.maintain()
    assert a.stopping() == {}


async def test_a_refresh_racing_a_hold_write_keeps_it(redis_stores: StoreFactory) -> None:
    # The refresh's snapshot is read while the write is on its way: adopting the snapshot as
    # it is would drop the hold (or bring back a released one) until the next refresh.
    clock = VirtualClock()
    store = ResilientStore(redis_stores(), clock=clock)
    await store.start()
    for i in range(20):
        clock.advance_by(1.0)
        await asyncio.gather(
            store.maintain(), store.hold_stopping(f"r{i}", error=DRAIN_500, ttl_s=600.0)
        )
        assert set(store.stopping()) == {f"r{j}" for j in range(i + 1)}
    for i in range(20):
        clock.advance_by(1.0)
        await asyncio.gather(store.maintain(), store.release_stopping(f"r{i}"))
        assert set(store.stopping()) == {f"r{j}" for j in range(i + 1, 20)}


async def test_holds_are_kept_locally_while_redis_is_down_and_replayed(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="gw-a"), clock=clock, jitter=0.0)
    await a.start()
    for _ in range(20):  # (a start that timed out on a busy host: connected before the outage)
        if not a.degraded:
            break
        clock.advance_by(10.0)
        await a.maintain()
    assert not a.degraded
    await a.hold_stopping("before", error=DRAIN_500, ttl_s=600.0)

    redis_server.stop()  # and its data with it
    await a.hold_stopping("during", error=DRAIN_500, ttl_s=600.0)
    assert a.degraded
    await a.hold_stopping("brief", error=DRAIN_500, ttl_s=5.0)
    # Degraded: the local view keeps this instance's holds (lapsing on time).
    assert set(a.stopping()) == {"before", "during", "brief"}

    redis_server.start()
    for _ in range(20):
        clock.advance_by(10.0)  # past any backoff, and past "brief"'s lifetime
        await a.maintain()
        if not a.degraded:
            break
    assert not a.degraded
    # Redis came back empty: the resync wrote back the holds A knew and replayed the
    # outage's, with the time they had left ("brief" had none left).
    other = redis_stores(instance_id="gw-b")
    view = await other.snapshot()
    assert _plain(view.stopping) == {"before": DRAIN_500, "during": DRAIN_500}
    assert all(h.left_s <= 600.0 - 10.0 for h in view.stopping.values())
    clock.advance_by(1.0)
    await a.maintain()
    assert set(a.stopping()) == {"before", "during"}
