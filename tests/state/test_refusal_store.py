"""Adapter-load refusals in the state store: the same behaviour from MemoryStore, RedisStore and
ResilientStore, shared by instances on one real redis-server, kept through Redis outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from store_kinds import STORE_KINDS, store_of_kind

from loragate.core.clock import VirtualClock
from loragate.state.keys import KeySpace
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import RefusalMap, ReplicaRecord, StateStore
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]

ERR = "LoRA rank 16 is greater than max_lora_rank 8"
# Names that a naive field encoding (joined with a separator) would confuse.
ODD = "ad|ap:ter ü"


def _plain(refusals: RefusalMap) -> dict[str, dict[str, tuple[str, str]]]:
    return {
        name: {rid: (x.path, x.error) for rid, x in by_replica.items()}
        for name, by_replica in refusals.items()
    }


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    async with store_of_kind(request) as made:
        yield made


async def test_record_replace_and_forget(store: StateStore) -> None:
    assert (await store.snapshot()).refusals == {}
    await store.record_refusal("r0", "a", path="/p/a", error=ERR, ttl_s=60.0)
    await store.record_refusal("r1", "a", path="/p/a", error="no --enable-lora", ttl_s=60.0)
    await store.record_refusal("r0", ODD, path="/p/odd", error=ERR, ttl_s=60.0)
    await store.record_refusal("r0|a", "x", path="/p/x", error=ERR, ttl_s=60.0)
    view = await store.snapshot()
    assert _plain(view.refusals) == {
        "a": {"r0": ("/p/a", ERR), "r1": ("/p/a", "no --enable-lora")},
        ODD: {"r0": ("/p/odd", ERR)},
        "x": {"r0|a": ("/p/x", ERR)},
    }
    assert all(
        0 < x.left_s <= 60.0 for by_replica in view.refusals.values() for x in by_replica.values()
    )

    # A new refusal of the same pair replaces the old one (path, error and lifetime).
    await store.record_refusal("r0", "a", path="/p/a2", error="cannot read", ttl_s=600.0)
    view = await store.snapshot()
    assert view.refusals["a"]["r0"].path == "/p/a2"
    assert view.refusals["a"]["r0"].error == "cannot read"
    assert 60.0 < view.refusals["a"]["r0"].left_s <= 600.0

    await store.forget_refusals("a", "r1")  # one replica's
    await store.forget_refusals("a", "r9")  # unknown: no-op
    await store.forget_refusals(ODD)  # every replica's
    await store.forget_refusals("nothing")
    assert _plain((await store.snapshot()).refusals) == {
        "a": {"r0": ("/p/a2", "cannot read")},
        "x": {"r0|a": ("/p/x", ERR)},
    }
    await store.record_refusal("r0", "x", path="/p/x", error=ERR, ttl_s=0.0)  # 0: forgotten
    await store.forget_refusals("a")
    assert _plain((await store.snapshot()).refusals) == {"x": {"r0|a": ("/p/x", ERR)}}


async def test_a_refusal_and_its_residency_change_are_one_write(store: StateStore) -> None:
    # The refused request had touched the adapter there: the refusal takes it out of the
    # replica's shadow residency in the same write (before, a second write did, and another
    # instance's refresh could see the refusal with the adapter still resident there).
    await store.upsert_replica(ReplicaRecord(replica_id="r0", url="http://r0"))
    for name in ("a", "b", "c"):
        await store.begin_request("r0", name, f"q-{name}", 0.0)
    await store.record_refusal("r0", "a", path="/p/a", error=ERR, ttl_s=60.0)
    view = await store.snapshot()
    assert _plain(view.refusals) == {"a": {"r0": ("/p/a", ERR)}}
    held = view.residency_of("r0")
    assert (held.registered, set(held.gpu), set(held.cpu)) == ({"b", "c"}, {"b", "c"}, {"b", "c"})
    # Not remembered (ttl 0): the residency change alone.
    await store.record_refusal("r0", "c", path="/p/c", error=ERR, ttl_s=0.0)
    view = await store.snapshot()
    assert _plain(view.refusals) == {"a": {"r0": ("/p/a", ERR)}}
    assert view.residency_of("r0").registered == {"b"}


async def test_memory_refusals_expire_on_its_clock() -> None:
    clock = VirtualClock(100.0)
    store = MemoryStore(clock=clock)
    await store.record_refusal("r0", "a", path="/p", error=ERR, ttl_s=10.0)
    await store.record_refusal("r1", "a", path="/p", error=ERR, ttl_s=30.0)
    clock.advance_by(9.5)
    assert store.refusals()["a"]["r0"].left_s == pytest.approx(0.5)
    clock.advance_by(0.5)
    assert _plain(store.view().refusals) == {"a": {"r1": ("/p", ERR)}}
    assert store.refusals()["a"]["r1"].left_s == pytest.approx(20.0)
    clock.advance_by(20.0)
    assert store.refusals() == {}


async def test_redis_refusals_expire_on_the_server_clock(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    store = redis_stores()
    await store.record_refusal("r0", "short", path="/p", error=ERR, ttl_s=0.2)
    await store.record_refusal("r0", "long", path="/p", error=ERR, ttl_s=60.0)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = store.keys.refusals
        # The hash lives as long as its longest-lived entry, no longer.
        assert 59_000 < await raw.pttl(key) <= 60_000
        for _ in range(200):  # bounded wait for the server clock to pass 0.2 s
            if "short" not in (await store.snapshot()).refusals:
                break
            await asyncio.sleep(0.02)
        view = await store.snapshot()
        assert _plain(view.refusals) == {"long": {"r0": ("/p", ERR)}}
        assert await raw.hlen(key) == 1  # the snapshot deleted the expired entry
        await store.forget_refusals("long", "r0")
        assert await raw.exists(key) == 0
    finally:
        await raw.aclose()


async def test_instances_share_refusals_through_their_refresh(
    redis_stores: StoreFactory,
) -> None:
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="gw-a"), clock=clock)
    b = ResilientStore(redis_stores(instance_id="gw-b"), clock=clock)
    await a.start()
    await b.start()
    await a.record_refusal("r0", "a", path="/p", error=ERR, ttl_s=60.0)
    assert _plain(a.refusals()) == {"a": {"r0": ("/p", ERR)}}  # at once, locally
    assert b.refusals() == {}  # until b's next refresh: no Redis call per read
    clock.advance_by(1.0)
    await b.maintain()
    assert _plain(b.refusals()) == {"a": {"r0": ("/p", ERR)}}
    assert _plain(b.view().refusals) == _plain(b.refusals())
    await b.forget_refusals("a", "r0")
    clock.advance_by(1.0)
    await a.maintain()
    assert a.refusals() == {}


async def test_a_refresh_racing_a_refusal_write_keeps_it(redis_stores: StoreFactory) -> None:
    # The refresh's snapshot is read while the refusal write is on its way: the snapshot
    # lacks the refusal, and adopting it as it is would drop it from the local view.
    clock = VirtualClock()
    store = ResilientStore(redis_stores(), clock=clock)
    await store.start()
    for i in range(20):
        clock.advance_by(1.0)
        await asyncio.gather(
            store.maintain(),
            store.record_refusal("r0", f"a{i}", path="/p", error=ERR, ttl_s=600.0),
        )
        assert set(store.refusals()) == {f"a{j}" for j in range(i + 1)}
    clock.advance_by(1.0)
    await store.maintain()
    assert set(store.refusals()) == {f"a{j}" for j in range(20)}


async def test_refusals_survive_redis_outages(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="gw-a"), clock=clock, jitter=0.0)
    await a.start()
    await a.record_refusal("r0", "before", path="/p", error=ERR, ttl_s=600.0)
    await a.record_refusal("r1", "gone", path="/p", error=ERR, ttl_s=600.0)

    redis_server.stop()  # and its data with it
    await a.record_refusal("r0", "during", path="/p", error=ERR, ttl_s=600.0)
    assert a.degraded
    await a.forget_refusals("gone")
    await a.record_refusal("r1", "brief", path="/p", error=ERR, ttl_s=5.0)
    # The local view serves on: what it had, plus what happened meanwhile.
    assert set(a.refusals()) == {"before", "during", "brief"}

    redis_server.start()
    for _ in range(20):
        clock.advance_by(10.0)  # past any backoff, and past "brief"'s lifetime
        await a.maintain()
        if not a.degraded:
            break
    assert not a.degraded
    # Redis came back empty: the recovery pushed what a knew and replayed the outage's
    # writes with the time they had left ("brief" had none left).
    other = redis_stores(instance_id="gw-b")
    view = await other.snapshot()
    assert _plain(view.refusals) == {
        "before": {"r0": ("/p", ERR)},
        "during": {"r0": ("/p", ERR)},
    }
    assert all(x.left_s <= 600.0 - 10.0 for by in view.refusals.values() for x in by.values())
    clock.advance_by(1.0)
    await a.maintain()
    assert set(a.refusals()) == {"before", "during"}


async def test_refusal_keys_follow_the_prefix(redis_stores: StoreFactory) -> None:
    store = redis_stores()
    assert store.keys.refusals.startswith(store.keys.prefix)
    assert KeySpace(prefix="x:").refusals == "x:refusals"
