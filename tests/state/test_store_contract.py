"""Behaviour every StateStore shares, run against MemoryStore and RedisStore alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from store_kinds import STORE_KINDS, store_of_kind

from loragate.core.clock import VirtualClock
from loragate.core.types import AdapterSpec, ReplicaSettings, ReplicaSnapshot, Residency
from loragate.state.keys import KeySpace, Ttls
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import GatewayStore, ReplicaRecord, StateStore
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]

SETTINGS = ReplicaSettings(max_loras=2, max_cpu_loras=3)
TTLS = Ttls(demand_bucket_s=10.0, demand_retention_s=3600.0)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    async with store_of_kind(request, ttls=TTLS) as made:
        yield made


async def add_replicas(store: StateStore, *ids: str) -> None:
    for r in ids:
        await store.upsert_replica(
            ReplicaRecord(replica_id=r, url=f"http://{r}:8000", settings=SETTINGS, updated_s=1.5)
        )


async def test_registry_roundtrip_and_version(store: StateStore) -> None:
    v0 = (await store.snapshot()).version
    await add_replicas(store, "r1", "r2")
    view = await store.snapshot()
    assert set(view.replicas) == {"r1", "r2"}
    assert view.replicas["r1"].url == "http://r1:8000"
    assert view.replicas["r1"].settings == SETTINGS
    assert view.replicas["r1"].healthy
    assert view.replicas["r1"].updated_s == 1.5
    assert view.version == v0 + 2
    assert view.residency_of("r1") == Residency()
    assert view.in_flight == {"r1": 0, "r2": 0}

    await store.set_replica_health("r2", False, 9.0)
    await store.set_replica_health("ghost", False, 9.0)  # unknown replica: no-op
    view = await store.snapshot()
    assert not view.replicas["r2"].healthy
    assert view.replicas["r2"].updated_s == 9.0
    assert "ghost" not in view.replicas
    assert view.version == v0 + 2  # health is not a config change

    await store.remove_replica("r1")
    view = await store.snapshot()
    assert set(view.replicas) == {"r2"}
    assert view.version == v0 + 3


async def test_begin_end_counts_and_residency(store: StateStore) -> None:
    await add_replicas(store, "r1", "r2")
    await store.begin_request("r1", "a", "q1", 100.0)
    await store.begin_request("r1", "b", "q2", 100.0)
    await store.begin_request("r1", "c", "q3", 101.0)
    await store.begin_request("r2", None, "q4", 101.0)  # base model: lease only
    view = await store.snapshot()
    assert view.in_flight == {"r1": 3, "r2": 1}
    assert view.residency_of("r1") == Residency(
        registered=frozenset("abc"), gpu=("b", "c"), cpu=("a", "b", "c")
    )
    assert view.residency_of("r2") == Residency()

    await store.end_request("r1", "q2")
    await store.end_request("r1", "q2")  # twice is harmless
    await store.end_request("r2", "q4")
    view = await store.snapshot()
    assert view.in_flight == {"r1": 2, "r2": 0}


async def test_admin_residency_ops(store: StateStore) -> None:
    await add_replicas(store, "r1")
    await store.record_load("r1", "a")
    await store.record_load("r1", "b")
    await store.begin_request("r1", "a", "q1", 0.0)
    await store.record_unload("r1", "b")
    await store.record_load("r1", "c")
    await store.reconcile("r1", frozenset({"a", "c", "z"}))
    view = await store.snapshot()
    # A load takes a GPU slot at once, as vLLM activates what it loads (add_adapter ends with
    # activate_adapter): c, loaded after a's request, holds the newer slot.
    assert view.residency_of("r1") == Residency(
        registered=frozenset({"a", "c", "z"}), gpu=("a", "c"), cpu=("a", "c")
    )
    # With both slots taken, a load evicts the least recently used one (a: CPU cache only).
    await store.record_load("r1", "d")
    view = await store.snapshot()
    assert view.residency_of("r1") == Residency(
        registered=frozenset({"a", "c", "d", "z"}), gpu=("c", "d"), cpu=("a", "c", "d")
    )


async def test_adapter_registry(store: StateStore) -> None:
    v0 = (await store.snapshot()).version
    spec = AdapterSpec(name="sql", path="/m/sql", rank=16, tenants=frozenset({"t1", "t2"}))
    assert await store.put_adapter(spec)
    assert await store.put_adapter(AdapterSpec(name="chat", path="/m/chat"))
    assert await store.list_adapters() == [AdapterSpec(name="chat", path="/m/chat"), spec]
    view = await store.snapshot()
    assert view.adapters["sql"] == spec
    assert view.version == v0 + 2
    assert await store.delete_adapter("chat")
    assert not await store.delete_adapter("chat")
    view = await store.snapshot()
    assert set(view.adapters) == {"sql"}
    assert view.version == v0 + 3
    assert await store.bump_version() == v0 + 4


async def test_demand_buckets(store: StateStore) -> None:
    await add_replicas(store, "r1")
    for i, t in enumerate([0.0, 5.0, 9.9, 10.0, 35.0]):
        await store.begin_request("r1", "a", f"q{i}", t)
    await store.begin_request("r1", "b", "qb", 12.0)
    await store.begin_request("r1", None, "qbase", 12.0)
    assert await store.demand(0.0, 40.0) == {0.0: {"a": 3}, 10.0: {"a": 1, "b": 1}, 30.0: {"a": 1}}
    # [10, 30) covers buckets 10 and 20 only; a range ending on a boundary excludes that bucket
    assert await store.demand(10.0, 30.0) == {10.0: {"a": 1, "b": 1}}
    assert await store.demand(9.0, 10.0) == {0.0: {"a": 3}}
    assert await store.demand(40.0, 100.0) == {}


async def test_leader_lease() -> None:
    clock = VirtualClock()
    store = MemoryStore(clock=clock)
    assert await store.acquire_leader("planner", "g1", 5.0)
    assert not await store.acquire_leader("planner", "g2", 5.0)
    assert await store.acquire_leader("planner", "g1", 5.0)  # renew
    assert await store.leader("planner") == "g1"
    clock.advance_by(6.0)
    assert await store.leader("planner") is None
    assert await store.acquire_leader("planner", "g2", 5.0)
    assert not await store.release_leader("planner", "g1")
    assert await store.release_leader("planner", "g2")
    assert await store.leader("planner") is None


async def test_leader_lease_redis(redis_stores: StoreFactory) -> None:
    a, b = redis_stores(), redis_stores()
    assert await a.acquire_leader("planner", "g1", 0.3)
    assert not await b.acquire_leader("planner", "g2", 5.0)
    assert await a.acquire_leader("planner", "g1", 5.0)  # renew (compare-and-renew)
    assert await b.leader("planner") == "g1"
    assert not await b.release_leader("planner", "g2")  # not the holder: no effect
    assert await b.leader("planner") == "g1"
    assert await a.release_leader("planner", "g1")
    assert await b.acquire_leader("planner", "g2", 0.05)
    # PX expiry: poll until gone (bounded), then g1 can take it
    for _ in range(200):
        if await a.leader("planner") is None:
            break
        await asyncio.sleep(0.01)
    assert await a.acquire_leader("planner", "g1", 5.0)


async def test_view_fills_pool_snapshots(store: StateStore) -> None:
    await add_replicas(store, "r1", "r2")
    await store.begin_request("r2", "a", "q1", 0.0)
    view = await store.snapshot()
    snaps = [ReplicaSnapshot(replica_id="r1", url="u1"), ReplicaSnapshot(replica_id="r2", url="u2")]
    filled = view.apply_to(snaps)
    assert [s.in_flight for s in filled] == [0, 1]
    assert filled[1].residency.gpu == ("a",)
    assert filled[0].residency == Residency()


async def test_gateway_stores_satisfy_the_protocol(redis_stores: StoreFactory) -> None:
    stores: list[GatewayStore] = [MemoryStore(), ResilientStore(redis_stores())]
    for s in stores:
        await s.upsert_replica(ReplicaRecord(replica_id="r1", url="u"))
        await s.begin_request("r1", "a", "q1", 0.0)
        assert s.view().in_flight == {"r1": 1}
        assert s.view().residency_of("r1").gpu == ("a",)


async def test_put_adapter_is_conditional_and_delete_leaves_a_tombstone(
    store: StateStore,
) -> None:
    first = AdapterSpec(name="sql", path="/m/sql", rank=16)
    assert await store.put_adapter(first)
    v1 = (await store.snapshot()).version
    # The name is taken: nothing changes (neither the spec nor the version).
    assert not await store.put_adapter(AdapterSpec(name="sql", path="/other", rank=8))
    view = await store.snapshot()
    assert view.adapters["sql"] == first
    assert view.version == v1
    assert await store.get_adapter("sql") == first
    assert await store.get_adapter("nope") is None
    assert view.tombstones == {}
    # A deletion leaves a tombstone, in force for tombstone_ttl_s.
    assert await store.delete_adapter("sql")
    view = await store.snapshot()
    assert "sql" not in view.adapters
    assert await store.get_adapter("sql") is None
    assert set(view.tombstones) == {"sql"}
    assert 0 < view.tombstones["sql"] <= TTLS.tombstone_ttl_s
    # Deleting what is not there leaves no tombstone.
    assert not await store.delete_adapter("never")
    assert "never" not in (await store.snapshot()).tombstones
    # A new registration of the name clears its tombstone.
    assert await store.put_adapter(AdapterSpec(name="sql", path="/m/sql2"))
    view = await store.snapshot()
    assert view.tombstones == {}
    assert view.adapters["sql"].path == "/m/sql2"


async def test_replace_adapter_swaps_a_registered_definition_only(store: StateStore) -> None:
    first = AdapterSpec(name="sql", path="/m/sql", rank=16, tenants=frozenset({"acme"}))
    second = AdapterSpec(name="sql", path="/m/sql-v2", rank=8)
    # Not registered: nothing changes (PUT's 404).
    assert await store.replace_adapter(second) is None
    assert "sql" not in (await store.snapshot()).adapters
    assert await store.put_adapter(first)
    v1 = (await store.snapshot()).version
    assert await store.replace_adapter(second) == first  # the definition replaced
    view = await store.snapshot()
    assert view.adapters["sql"] == second and view.version > v1
    assert await store.get_adapter("sql") == second
    # With expected: only if registered as expected (a PUT's put-back).
    assert await store.replace_adapter(first, expected=first) is None
    assert (await store.snapshot()).adapters["sql"] == second
    assert await store.replace_adapter(first, expected=second) == second
    assert (await store.snapshot()).adapters["sql"] == first
    # A deleted name is not replaced (no resurrection past its tombstone).
    assert await store.delete_adapter("sql")
    assert await store.replace_adapter(second) is None
    assert "sql" not in (await store.snapshot()).adapters


async def test_paths_in_force_name_the_registered_path_and_a_replacement_under_way(
    store: StateStore,
) -> None:
    assert await store.paths_in_force("sql") == frozenset()
    assert await store.put_adapter(AdapterSpec(name="sql", path="/m/sql"))
    assert await store.paths_in_force("sql") == {"/m/sql"}
    await store.begin_replacing("sql", "/m/sql-v2", 60.0)  # a PUT under way
    assert await store.paths_in_force("sql") == {"/m/sql", "/m/sql-v2"}
    await store.end_replacing("sql")
    assert await store.paths_in_force("sql") == {"/m/sql"}
    await store.begin_replacing("sql", "/m/sql-v3", 0.001)  # its instance crashed: it lapses
    await asyncio.sleep(0.05)
    assert await store.paths_in_force("sql") == {"/m/sql"}


async def test_tombstones_expire() -> None:
    clock = VirtualClock()
    store = MemoryStore(ttls=Ttls(tombstone_ttl_s=5.0), clock=clock)
    assert await store.put_adapter(AdapterSpec(name="a", path="/a"))
    assert await store.delete_adapter("a")
    clock.advance_by(4.0)
    assert store.view().tombstones == {"a": 1.0}
    clock.advance_by(1.0)
    assert store.view().tombstones == {}


async def test_racing_registrations_of_one_name_on_redis_one_wins(
    redis_server: RedisServer,
) -> None:
    stores = [
        RedisStore.from_url(redis_server.url, keys=KeySpace(prefix="race:"), op_timeout_s=2.0)
        for _ in range(4)
    ]
    try:
        for i in range(20):
            name = f"a{i}"
            results = await asyncio.gather(
                *(
                    s.put_adapter(AdapterSpec(name=name, path=f"/p{k}"))
                    for k, s in enumerate(stores)
                )
            )
            assert sorted(results) == [False, False, False, True]
            winner = f"/p{results.index(True)}"
            assert (await stores[0].get_adapter(name)) == AdapterSpec(name=name, path=winner)
        # Each registration bumped the version once.
        assert (await stores[0].snapshot()).version == 20
    finally:
        for s in stores:
            await s.close()
