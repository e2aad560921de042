"""Config-file definitions on Redis are renewed by one lease key per instance and claim
(``P deflease:I|G``, ``RedisStore.renew_definitions``), not by sending every claim again; the
rule of ``state.definitions`` holds as before: a definition stays in force while an instance
whose file agrees renews, lapses ``lease_ttl_s`` after the last renewal of the claims that
held it (an instance stopped, or its file no longer defines the name), and a renewal Redis
cannot do (it lost its data) says so, so the caller claims in full."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from loragate.state.definitions import AdapterDefinition, DefinitionClaim
from loragate.state.keys import Ttls
from loragate.state.redis_store import RedisStore
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]
TTL_S = 0.4
TTLS = Ttls(lease_ttl_s=TTL_S, lease_renew_s=0.1)
A = AdapterDefinition(path="/a/x", rank=8)
B = AdapterDefinition(path="/b/x", rank=8)


def _claims(**defs: AdapterDefinition) -> list[DefinitionClaim]:
    return [DefinitionClaim(name=n, ours=d) for n, d in defs.items()]


async def _winner(store: RedisStore, name: str) -> str:
    """Who holds ``name`` now, as a claim of B's definition by ``store`` finds it."""
    in_force = await store.claim_definitions(_claims(**{name: B}))
    return in_force[name].definition.instance


async def test_renewing_the_lease_keeps_every_definition_past_its_ttl(
    redis_stores: StoreFactory,
) -> None:
    a = redis_stores(instance_id="gw-a", ttls=TTLS)
    b = redis_stores(instance_id="gw-b", ttls=TTLS)
    assert not await a.renew_definitions()  # nothing claimed yet: claim in full
    await a.claim_definitions(_claims(x=A, y=A))
    for _ in range(6):  # 0.6 s: longer than the claims live unless renewed
        await asyncio.sleep(TTL_S / 4)
        assert await a.renew_definitions()
    assert await _winner(b, "x") == "gw-a"
    # A stops renewing (stopped, crashed): its definitions lapse and the next claim wins.
    await asyncio.sleep(TTL_S + 0.1)
    assert await _winner(b, "y") == "gw-b"


async def test_a_name_the_file_dropped_lapses_though_the_instance_renews_on(
    redis_stores: StoreFactory,
) -> None:
    a = redis_stores(instance_id="gw-a", ttls=TTLS)
    b = redis_stores(instance_id="gw-b", ttls=TTLS)
    await a.claim_definitions(_claims(x=A, y=A))
    await a.claim_definitions(_claims(y=A))  # reloaded: x is gone from A's file
    for _ in range(6):
        await asyncio.sleep(TTL_S / 4)
        assert await a.renew_definitions()
    assert await _winner(b, "x") == "gw-b"  # lapsed TTL_S after A's last claim of it
    assert await _winner(b, "y") == "gw-a"  # renewed all along


async def test_a_definition_two_instances_hold_stays_while_either_renews(
    redis_stores: StoreFactory,
) -> None:
    a = redis_stores(instance_id="gw-a", ttls=TTLS)
    b = redis_stores(instance_id="gw-b", ttls=TTLS)
    c = redis_stores(instance_id="gw-c", ttls=TTLS)
    await a.claim_definitions(_claims(x=A))
    in_force = await b.claim_definitions(_claims(x=A))  # agrees: B holds it too
    assert in_force["x"].definition.instance == "gw-a"
    for _ in range(6):  # A is gone; B renews
        await asyncio.sleep(TTL_S / 4)
        assert await b.renew_definitions()
    assert await _winner(c, "x") == "gw-a"


async def test_after_redis_lost_its_data_a_renewal_asks_for_a_full_claim(
    redis_stores: StoreFactory, redis_server: RedisServer
) -> None:
    a = redis_stores(instance_id="gw-a", ttls=TTLS)
    await a.claim_definitions(_claims(x=A))
    assert await a.renew_definitions()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    assert not await a.renew_definitions()
    await a.claim_definitions(_claims(x=A))
    assert await a.renew_definitions()


async def test_claiming_the_same_names_again_writes_no_entry(
    redis_stores: StoreFactory, redis_server: RedisServer
) -> None:
    """A full claim comes after every move of the store's version (each admin registration
    moves it): with every entry held by this instance's lease already, it only reads."""
    a = redis_stores(instance_id="gw-a", ttls=TTLS)
    claims = [DefinitionClaim(name=f"a{i}", ours=A) for i in range(50)]
    await a.claim_definitions(claims)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.config_resetstat()
        in_force = await a.claim_definitions(claims)
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    assert {d.definition.instance for d in in_force.values()} == {"gw-a"}
    assert "cmdstat_hset" not in stats
    assert stats["cmdstat_hget"]["calls"] == 2 * 50  # the registry's and the definition's
