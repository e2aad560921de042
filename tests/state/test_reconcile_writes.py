"""A poll that finds a replica's adapters unchanged writes nothing to Redis.

Every poll of every replica by every instance reconciled the shared registered set with the
replica's ``/v1/models``, and the script rewrote the whole set (DEL, then one SADD per adapter)
even when nothing had changed: idle, 2 instances x 4 replicas x 40 adapters cost Redis ~1,000
commands/s (SADD 624/s, EVALSHA 23.6/s; bench/state_idle_cost.py). Now the script writes only
the difference, and ``ResilientStore`` sends nothing when its mirror (the shared view of the
last refresh plus its own writes since) holds that residency already; a change is still
written, also against one another instance made (compared with the refreshed shared view, not
with what this instance wrote last: from its next refresh on).

Counted with Redis's INFO commandstats on a real redis-server (commands inside scripts
included).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from loragate.core.clock import VirtualClock
from loragate.core.types import ReplicaSettings, Residency
from loragate.state.keys import KeySpace
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import ReplicaRecord
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]

WRITES = ("sadd", "srem", "del", "rpush", "lpush", "lrem", "lpop", "hset", "hdel", "hincrby")
ADAPTERS = frozenset(f"a{i}" for i in range(40))


class Calls:
    """Redis's calls per command since the last ``take``."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._last: dict[str, int] = {}

    async def take(self) -> dict[str, int]:
        stats = await self._client.info("commandstats")
        now = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        out = {k: n - self._last.get(k, 0) for k, n in now.items() if n != self._last.get(k, 0)}
        self._last = now
        out.pop("info", None)
        return out


@pytest.fixture
async def calls(redis_server: RedisServer) -> AsyncIterator[Calls]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield Calls(client)
    finally:
        await client.aclose()


def _writes(counts: dict[str, int]) -> dict[str, int]:
    return {k: n for k, n in counts.items() if k in WRITES}


async def _replica(store: RedisStore | ResilientStore) -> None:
    settings = ReplicaSettings(max_loras=2, max_cpu_loras=4)
    await store.upsert_replica(ReplicaRecord(replica_id="r1", url="r1", settings=settings))
    await store.reconcile("r1", ADAPTERS)
    for a in ("a1", "a2", "a3"):
        await store.record_load("r1", a)


async def test_redis_store_writes_only_the_difference(
    redis_stores: StoreFactory, calls: Calls
) -> None:
    store = redis_stores()
    await _replica(store)
    await calls.take()
    await store.reconcile("r1", ADAPTERS)  # unchanged
    counts = await calls.take()
    assert counts.get("evalsha") == 1
    assert _writes(counts) == {}  # before: del 1 (+1 per list), sadd 40
    before = (await store.snapshot()).residency_of("r1")
    assert before == Residency(registered=ADAPTERS, gpu=("a2", "a3"), cpu=("a1", "a2", "a3"))

    changed = (ADAPTERS - {"a2", "a7"}) | {"new"}  # a2 unloaded (in both lists), a7 too
    await store.reconcile("r1", changed)
    counts = await calls.take()
    assert counts["srem"] == 2 and counts["sadd"] == 1
    assert (await store.snapshot()).residency_of("r1") == Residency(
        registered=changed, gpu=("a3",), cpu=("a1", "a3")
    )


async def test_resilient_store_sends_nothing_for_an_unchanged_poll(
    redis_server: RedisServer, calls: Calls
) -> None:
    keys = KeySpace(prefix=f"w{uuid.uuid4().hex[:8]}:")
    clock = VirtualClock()
    a = ResilientStore(RedisStore.from_url(redis_server.url, keys=keys), clock=clock)
    b = ResilientStore(RedisStore.from_url(redis_server.url, keys=keys), clock=clock)
    probe = RedisStore.from_url(redis_server.url, keys=keys)
    try:
        await a.start()
        await b.start()
        await _replica(a)
        clock.advance_by(1.0)
        await b.maintain()  # b's mirror: the shared view, with a's writes
        await calls.take()
        for s in (a, b):
            await s.reconcile("r1", ADAPTERS)  # an idle poll each
        assert await calls.take() == {}  # not even a round trip (before: evalsha 2, sadd 80)

        # A change is written, as before, with its stamp (change number, by whom: HINCRBY and
        # HSET P rep:R:stamps).
        await b.reconcile("r1", ADAPTERS - {"a9"})
        assert _writes(await calls.take()) == {"srem": 1, "hset": 1, "hincrby": 1}
        assert (await probe.snapshot()).residency_of("r1").registered == ADAPTERS - {"a9"}
        await calls.take()

        # a polls the replica listing a9 (it has it again, say). a has not refreshed since
        # b's write: its mirror lists a9, so nothing is sent yet; a refresh later (the shared
        # view without a9) the next poll writes it, though a's own last write was that set.
        await a.reconcile("r1", ADAPTERS)
        assert await calls.take() == {}
        clock.advance_by(1.0)
        await a.maintain()
        await calls.take()
        await a.reconcile("r1", ADAPTERS)
        assert _writes(await calls.take()) == {"sadd": 1, "hset": 1, "hincrby": 1}
        assert (await probe.snapshot()).residency_of("r1").registered == ADAPTERS

        # b refreshes (the shared view lists a9 again) and its next poll does not: written,
        # though b's own last write was that very set.
        clock.advance_by(1.0)
        await b.maintain()
        await calls.take()
        await b.reconcile("r1", ADAPTERS - {"a9"})
        assert _writes(await calls.take()) == {"srem": 1, "hset": 1, "hincrby": 1}
        assert (await probe.snapshot()).residency_of("r1").registered == ADAPTERS - {"a9"}
    finally:
        for s in (a, b):
            await s.close()
        await probe.close()
