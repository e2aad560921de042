"""Redis stops and restarts under traffic: no call fails, the view survives, state resyncs.

Against a real redis-server, stopped and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from loragate.core.clock import VirtualClock
from loragate.core.types import AdapterSpec, ReplicaSettings
from loragate.state.keys import Ttls
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore, run_maintenance
from loragate.state.store import ReplicaRecord, StateUnavailableError
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]
SETTINGS = ReplicaSettings(max_loras=2, max_cpu_loras=4)


async def _setup(factory: StoreFactory, clock: VirtualClock, name: str) -> ResilientStore:
    store = ResilientStore(factory(instance_id=name), clock=clock, jitter=0.0)
    await store.start()
    assert not store.degraded
    return store


async def _recover(store: ResilientStore, clock: VirtualClock) -> None:
    """Drive maintenance (bounded) until the store is back in sync."""
    for _ in range(20):
        clock.advance_by(10.0)  # past any backoff
        await store.maintain()
        if not store.degraded:
            return
    raise AssertionError(f"store did not recover (errors={store.error_count})")


async def test_redis_restart_empty_under_traffic(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    gw = await _setup(redis_stores, clock, "gw-a")
    for r in ("r1", "r2"):
        await gw.upsert_replica(ReplicaRecord(replica_id=r, url=f"http://{r}", settings=SETTINGS))
    await gw.put_adapter(AdapterSpec(name="lora-0", path="/a/0"))
    await gw.begin_request("r1", "lora-0", "before-1", 100.0)
    await gw.begin_request("r2", "lora-0", "before-2", 100.0)

    redis_server.stop()  # data lost: no persistence

    # Traffic while Redis is down: nothing raises, the first failure flips to degraded.
    expected_in_flight = {"r1": 1, "r2": 1}
    last_adapter = {}
    for i in range(40):
        r = "r1" if i % 2 else "r2"
        await gw.begin_request(r, f"lora-{i % 5}", f"down-{i}", 200.0 + i)
        expected_in_flight[r] += 1
        last_adapter[r] = f"lora-{i % 5}"
        if i % 4 == 0:
            await gw.end_request(r, f"down-{i}")
            expected_in_flight[r] -= 1
    await gw.end_request("r2", "before-2")
    expected_in_flight["r2"] -= 1
    await gw.put_adapter(AdapterSpec(name="lora-new", path="/a/new", rank=32))
    await gw.record_load("r2", "lora-9")
    assert gw.degraded
    assert gw.view().degraded
    # ... and while degraded, requests do not touch Redis at all: one error for 40 requests.
    assert gw.error_count == 1
    assert not await gw.acquire_leader("planner", "gw-a", 5.0)  # no leadership when cut off
    assert await gw.demand(0.0, 300.0)  # local counts still answer

    local = gw.view()
    assert local.residency_of("r1").gpu[-1] == last_adapter["r1"]
    assert local.residency_of("r2").cpu[-1] == "lora-9"
    assert local.in_flight == expected_in_flight
    assert set(local.adapters) == {"lora-0", "lora-new"}

    # Retries back off while it stays down (one error per attempt, not per request).
    errors = gw.error_count
    await _try_maintain_down(gw, clock)
    assert gw.degraded
    assert gw.error_count > errors

    redis_server.start()  # same port, empty
    await _recover(gw, clock)

    # A fresh instance sees the state the degraded one kept.
    other = redis_stores(instance_id="gw-b")
    shared = await other.snapshot()
    assert set(shared.replicas) == {"r1", "r2"}
    assert shared.replicas["r1"].settings == SETTINGS
    assert shared.residency == local.residency
    assert shared.in_flight == local.in_flight  # leases re-acquired
    assert set(shared.adapters) == {"lora-0", "lora-new"}
    assert shared.adapters["lora-new"].rank == 32
    demand = await other.demand(200.0, 240.0)
    assert sum(sum(c.values()) for c in demand.values()) == 40  # replayed from the journal
    assert gw.journal_len == 0
    assert await gw.acquire_leader("planner", "gw-a", 5.0)


async def _try_maintain_down(gw: ResilientStore, clock: VirtualClock) -> None:
    for _ in range(3):
        clock.advance_by(10.0)
        await gw.maintain()


async def test_restart_with_data_kept_does_not_resurrect(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    a = await _setup(redis_stores, clock, "gw-a")
    b = await _setup(redis_stores, clock, "gw-b")
    await a.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    await a.put_adapter(AdapterSpec(name="old", path="/old"))
    await a.put_adapter(AdapterSpec(name="keep", path="/keep"))
    await a.begin_request("r1", "keep", "q1", 0.0)
    await a.begin_request("r1", "keep", "q2", 0.0)
    clock.advance_by(1.0)
    await b.maintain()  # b refreshes its mirror: it knows about "old"
    assert "old" in b.view().adapters

    redis_server.stop(save=True)  # SHUTDOWN SAVE: the data survives the restart
    await a.end_request("r1", "q1")  # a request on a ends during the outage
    await a.begin_request("r1", "new", "q3", 1.0)
    assert a.degraded
    redis_server.start()
    # b comes back first and deletes "old" ...
    await b.delete_adapter("old")
    await _recover(b, clock)
    assert "old" not in (await redis_stores().snapshot()).adapters
    # ... then a resyncs: its mirror still lists "old", but Redis kept its data, so a must
    # replay its own writes only and not push its stale view.
    await _recover(a, clock)

    raw = await redis_stores().snapshot()
    assert set(raw.adapters) == {"keep"}
    assert raw.in_flight == {"r1": 2}  # q2 and q3: the stale lease of q1 was dropped
    assert raw.residency_of("r1").gpu == ("keep", "new")
    clock.advance_by(1.0)
    await a.maintain()
    assert set(a.view().adapters) == {"keep"}


async def test_start_while_redis_down(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    redis_server.stop()
    clock = VirtualClock()
    gw = ResilientStore(redis_stores(instance_id="gw-a"), clock=clock, jitter=0.0)
    await gw.start()  # no exception
    assert gw.degraded
    await gw.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    await gw.begin_request("r1", "lora-0", "q1", 0.0)
    assert gw.view().in_flight == {"r1": 1}
    # The raw store does raise, with our error type.
    raised = False
    try:
        await gw.remote.snapshot()
    except StateUnavailableError:
        raised = True
    assert raised
    redis_server.start()
    await _recover(gw, clock)
    raw = await redis_stores().snapshot()
    assert raw.in_flight == {"r1": 1}
    assert raw.residency_of("r1").gpu == ("lora-0",)


async def test_data_loss_without_disconnect_is_detected(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    clock = VirtualClock()
    gw = await _setup(redis_stores, clock, "gw-a")
    await gw.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    await gw.begin_request("r1", "lora-0", "q1", 0.0)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()  # e.g. an operator wipes Redis: no connection error at all
    finally:
        await client.aclose()
    clock.advance_by(1.0)
    await gw.maintain()  # the refresh sees a missing epoch and pushes its view back
    assert not gw.degraded
    raw = await redis_stores().snapshot()
    assert set(raw.replicas) == {"r1"}
    assert raw.residency_of("r1").gpu == ("lora-0",)
    assert raw.in_flight == {"r1": 1}


async def test_stop_and_restart_under_concurrent_traffic(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    """Two instances with their maintenance loops running; Redis dies and returns twice."""
    ttls = Ttls(refresh_s=0.05, retry_initial_s=0.05, retry_max_s=0.2)
    gws = [ResilientStore(redis_stores(ttls=ttls, instance_id=f"gw-{i}")) for i in range(2)]
    for gw in gws:
        await gw.start()
    await gws[0].upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    await gws[0].upsert_replica(ReplicaRecord(replica_id="r2", url="r2", settings=SETTINGS))
    loops = [asyncio.create_task(run_maintenance(gw, interval_s=0.01)) for gw in gws]
    done = 0
    milestones = {100: asyncio.Event(), 200: asyncio.Event()}

    async def client(k: int) -> None:
        nonlocal done
        for i in range(150):
            gw = gws[(k + i) % 2]
            r = "r1" if i % 3 else "r2"
            await gw.begin_request(r, f"lora-{(k * 7 + i) % 6}", f"c{k}-{i}", time.time())
            await asyncio.sleep(0.002)
            await gw.end_request(r, f"c{k}-{i}")
            done += 1
            if done in milestones:
                milestones[done].set()

    clients = asyncio.gather(*(client(k) for k in range(4)))
    try:
        for save in (False, True):
            await asyncio.wait_for(milestones[200 if save else 100].wait(), timeout=60)
            await asyncio.to_thread(redis_server.stop, save=save)
            await asyncio.sleep(0.3)  # clients keep going meanwhile
            await asyncio.to_thread(redis_server.start)
        await clients  # no client call raised
        for _ in range(500):  # bounded wait for both to resync
            if not any(gw.degraded for gw in gws):
                break
            await asyncio.sleep(0.01)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    assert done == 600
    assert not any(gw.degraded for gw in gws)
    assert all(gw.resyncs >= 2 for gw in gws)  # each noticed at least one outage
    for gw in gws:
        await gw.remote.sync_leases()
    raw = await redis_stores().snapshot()
    assert raw.in_flight == {"r1": 0, "r2": 0}  # every lease released or dropped at resync
    assert set(raw.replicas) == {"r1", "r2"}
    assert all(raw.residency_of(r).gpu for r in ("r1", "r2"))


async def test_resync_ends_while_leases_change_during_every_sync(
    redis_server: RedisServer, redis_stores: StoreFactory
) -> None:
    """Leases begin and end, and touches are journaled, between every await of the resync: a
    resync that chased them (replay, sync, until nothing changed) would run as long as the
    traffic let it. It makes one pass; the next maintenance round replays what the traffic
    journaled meanwhile and leaves Redis holding exactly the live leases."""
    clock = VirtualClock()
    gw = ResilientStore(
        redis_stores(instance_id="gw-churn"), clock=clock, jitter=0.0, journal_max=200
    )
    await gw.start()
    await gw.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=SETTINGS))
    redis_server.stop()
    await gw.begin_request("r1", "lora-0", "down-0", 1.0)  # flips to degraded
    assert gw.degraded
    redis_server.start()

    stop = asyncio.Event()
    churned = 0

    async def churn() -> None:
        nonlocal churned
        i = 0
        while not stop.is_set():
            await gw.begin_request("r1", f"lora-{i % 3}", f"churn-{i}", 2.0)
            await asyncio.sleep(0)
            await gw.end_request("r1", f"churn-{i}")
            churned += 1
            i += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(churn())
    try:
        await asyncio.sleep(0)
        # A hang guard, not a timing assertion: a drain chasing the churn never returns.
        await asyncio.wait_for(_recover(gw, clock), timeout=60)
    finally:
        stop.set()
        await task
    assert not gw.degraded
    assert churned > 0
    # Nothing written during the resync is lost: what it did not replay waits in the journal,
    # later writes queue behind it (an unload must not be overtaken by the older load), and
    # the next maintenance round replays it all in order. (Admin registry writes do not queue:
    # they replay the journal first and Redis decides them, see test_resync_registry.py.)
    # (The churn outruns any bounded journal: journal_max 200 keeps the newest entries and
    # counts the older ones in journal_dropped, as during a long outage.)
    left = gw.journal_len
    assert 0 < left <= 200  # the churn's adapter touches, written while the resync ran
    dropped = gw.journal_dropped
    await gw.record_load("r1", "late")
    await gw.record_unload("r1", "late")
    assert gw.journal_len == min(200, left + 2)
    await gw.end_request("r1", "down-0")
    await gw.maintain()
    assert gw.journal_len == 0
    assert gw.journal_dropped - dropped == max(0, left + 2 - 200)
    # The leases that changed after the resync's sync were synced by that round too.
    raw = await redis_stores().snapshot()
    assert raw.in_flight == {"r1": 0}
    assert "late" not in raw.residency_of("r1").registered


async def test_redis_down_at_start_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The outage warning was only logged on a healthy -> down transition, so a gateway
    started while Redis was unreachable said nothing above DEBUG."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", op_timeout_s=0.5)
    store = ResilientStore(remote, clock=VirtualClock(), jitter=0.0)
    caplog.set_level(logging.WARNING, logger="loragate.state")
    try:
        await store.start()
        assert store.degraded
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("Redis unreachable at start-up" in m for m in warnings), warnings
    finally:
        await store.close()
