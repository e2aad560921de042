"""Config-file adapter definitions arbitrated between instances (``state.definitions``): the
same rule in ``MemoryStore`` and in Redis's script (a real redis-server), and what
``ResilientStore`` keeps across Redis losing its data or going away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from loragate.core.clock import VirtualClock
from loragate.core.types import AdapterSpec
from loragate.state.definitions import (
    REGISTERED,
    AdapterDefinition,
    DefinitionClaim,
    DefinitionMap,
)
from loragate.state.keys import Ttls
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]
TTL_S = 0.4  # claims lapse this long after their last renewal
TTLS = Ttls(lease_ttl_s=TTL_S, lease_renew_s=0.1)
A = AdapterDefinition(path="/a/x", rank=8)
B = AdapterDefinition(path="/b/x", rank=8)
B16 = AdapterDefinition(path="/a/x", rank=16)  # same path, another rank: another definition

# claim(instance, ours, previous) -> the definition in force for "x"
Claim = Callable[[str, AdapterDefinition, AdapterDefinition | None], Awaitable[AdapterDefinition]]


def _claim(ours: AdapterDefinition, previous: AdapterDefinition | None) -> list[DefinitionClaim]:
    return [DefinitionClaim(name="x", ours=ours, previous=previous)]


async def _rule(claim: Claim, lapse: Callable[[], Awaitable[None]]) -> None:
    in_force = await claim("gw-a", A, None)
    assert (in_force.path, in_force.instance) == (A.path, "gw-a")  # the first claim wins
    in_force = await claim("gw-b", B, None)
    assert (in_force.path, in_force.instance) == (A.path, "gw-a")  # and stays
    assert (await claim("gw-b", B16, None)).agrees(A)  # a rank differs just as much
    assert (await claim("gw-a", A, None)).instance == "gw-a"  # renewed
    # B's file changes from /c to /b: not what is in force, so nothing changes.
    assert (await claim("gw-b", B, AdapterDefinition(path="/c/x", rank=8))).agrees(A)
    # A's file changes from /a to /b and A reloads: its change replaces its own definition.
    in_force = await claim("gw-a", B, A)
    assert (in_force.path, in_force.instance) == (B.path, "gw-a")
    # Nobody renews it any more: it lapses, and the next claim wins.
    await lapse()
    in_force = await claim("gw-c", A, None)
    assert (in_force.path, in_force.instance) == (A.path, "gw-c")


async def test_the_rule_in_the_embedded_store() -> None:
    clock = VirtualClock()
    store = MemoryStore(ttls=TTLS, clock=clock)

    async def claim(
        instance: str, ours: AdapterDefinition, previous: AdapterDefinition | None
    ) -> AdapterDefinition:
        store.instance_id = instance
        return (await store.claim_definitions(_claim(ours, previous)))["x"].definition

    async def lapse() -> None:
        clock.advance_by(TTL_S + 0.01)

    await _rule(claim, lapse)


async def test_the_rule_on_redis(redis_stores: StoreFactory) -> None:
    stores = {name: redis_stores(instance_id=name, ttls=TTLS) for name in ("gw-a", "gw-b", "gw-c")}
    versions: list[int] = []

    async def claim(
        instance: str, ours: AdapterDefinition, previous: AdapterDefinition | None
    ) -> AdapterDefinition:
        in_force = await stores[instance].claim_definitions(_claim(ours, previous))
        versions.append((await stores[instance].snapshot()).version)
        assert 0 < in_force["x"].left_s <= TTL_S
        return in_force["x"].definition

    async def lapse() -> None:
        await asyncio.sleep(TTL_S + 0.05)  # Redis measures the claims' lifetime itself

    await _rule(claim, lapse)
    # The version moved only when the definition in force changed (first claim, A's change).
    assert versions[0] == versions[1] == versions[2] == versions[3] == versions[4]
    assert versions[5] == versions[4] + 1


async def _resilient(factory: StoreFactory, name: str, clock: VirtualClock) -> ResilientStore:
    store = ResilientStore(factory(instance_id=name, ttls=TTLS), clock=clock, jitter=0.0)
    await store.start()
    assert not store.degraded
    return store


def _x(in_force: DefinitionMap) -> tuple[str, str]:
    return in_force["x"].definition.path, in_force["x"].definition.instance


async def test_the_definition_in_force_survives_redis_losing_its_data(
    redis_stores: StoreFactory, redis_server: RedisServer
) -> None:
    """Whichever instance claims first after a FLUSHALL, the definition in force stays."""
    ttls = Ttls(lease_ttl_s=60.0, lease_renew_s=10.0)  # no lapse here
    clock = VirtualClock()
    a = ResilientStore(redis_stores(instance_id="gw-a", ttls=ttls), clock=clock, jitter=0.0)
    b = ResilientStore(redis_stores(instance_id="gw-b", ttls=ttls), clock=clock, jitter=0.0)
    for s in (a, b):
        await s.start()
    assert _x(await a.claim_definitions(_claim(A, None))) == (A.path, "gw-a")
    assert _x(await b.claim_definitions(_claim(B, None))) == (A.path, "gw-a")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    # B (whose file says /b) claims first: it writes back what was in force, not its own.
    assert _x(await b.claim_definitions(_claim(B, None))) == (A.path, "gw-a")
    assert _x(await a.claim_definitions(_claim(A, None))) == (A.path, "gw-a")


async def test_while_redis_is_down_the_definition_last_in_force_stays(
    redis_stores: StoreFactory, redis_server: RedisServer
) -> None:
    clock = VirtualClock()
    a = await _resilient(redis_stores, "gw-a", clock)
    b = await _resilient(redis_stores, "gw-b", clock)
    c = await _resilient(redis_stores, "gw-c", clock)
    await a.claim_definitions(_claim(A, None))
    assert _x(await b.claim_definitions(_claim(B, None))) == (A.path, "gw-a")
    redis_server.stop()
    try:
        await b.begin_request("r1", None, "q", 0.0)  # notices the outage
        assert b.degraded
        clock.advance_by(3600.0)  # lapsed on our clock: nobody can tell, so it stays
        assert _x(await b.claim_definitions(_claim(B, None))) == (A.path, "gw-a")
        # An instance that never saw a definition for the name serves its own meanwhile.
        await c.begin_request("r1", None, "q", 0.0)
        own = await c.claim_definitions([DefinitionClaim(name="y", ours=B)])
        assert (own["y"].definition.path, own["y"].definition.instance) == (B.path, "gw-c")
    finally:
        redis_server.start()


async def test_a_name_a_config_file_defines_cannot_be_registered_through_the_admin_api(
    redis_stores: StoreFactory,
) -> None:
    """Else one instance would serve the admin registration and another its file's adapter,
    and the replicas flip between the two paths."""
    clock = VirtualClock()
    memory = MemoryStore(ttls=TTLS, clock=clock)
    redis = redis_stores(instance_id="gw-a", ttls=TTLS)
    spec = AdapterSpec(name="x", path="/admin/x", rank=8)
    for store in (memory, redis):
        await store.claim_definitions(_claim(A, None))
        assert not await store.put_adapter(spec)
        assert await store.get_adapter("x") is None
        assert (await store.claim_definitions(_claim(A, None)))["x"].definition.agrees(A)
    # Once the definition lapsed (no instance's file has the name), the name is free.
    clock.advance_by(TTL_S + 0.01)
    await asyncio.sleep(TTL_S + 0.05)
    for store in (memory, redis):
        assert await store.put_adapter(spec)
        assert await store.get_adapter("x") == spec


async def test_a_name_registered_through_the_admin_api_is_the_registration_s_for_a_claim(
    redis_stores: StoreFactory,
) -> None:
    """The reverse of the 409 above: a config file that defines a name registered before gets
    the registration as the definition in force (nothing claimed, the version unchanged), until
    the registration is deleted; then the claim wins."""
    clock = VirtualClock()
    memory = MemoryStore(ttls=TTLS, clock=clock)
    memory.instance_id = "gw-a"
    redis = redis_stores(instance_id="gw-a", ttls=TTLS)
    spec = AdapterSpec(name="x", path="/admin/x", rank=16)
    for store in (memory, redis):
        assert await store.put_adapter(spec)
        version = (await store.snapshot()).version
        in_force = await store.claim_definitions(_claim(A, None))
        assert in_force["x"].definition == AdapterDefinition(
            path="/admin/x", rank=16, instance=REGISTERED
        )
        assert in_force["x"].left_s > 0
        # A reload of that file changing its definition changes nothing either.
        assert (await store.claim_definitions(_claim(B, A)))["x"].definition.instance == REGISTERED
        assert (await store.snapshot()).version == version
        assert await store.get_adapter("x") == spec  # the registration stands
        assert await store.delete_adapter("x")
        assert _x(await store.claim_definitions(_claim(B, None))) == (B.path, "gw-a")
        assert not await store.put_adapter(spec)  # now the file's: a 409 in the admin API


async def test_a_deleted_registration_is_not_written_back_as_a_definition(
    redis_stores: StoreFactory,
) -> None:
    """``ResilientStore`` writes back the definition it last saw in force when Redis lost it;
    a registration it saw in force is not one (else deleting the registration would put it
    back in force as a config definition)."""
    clock = VirtualClock()
    a = await _resilient(redis_stores, "gw-a", clock)
    spec = AdapterSpec(name="x", path="/admin/x", rank=8)
    assert await a.put_adapter(spec)
    assert _x(await a.claim_definitions(_claim(A, None))) == ("/admin/x", REGISTERED)
    assert await a.delete_adapter("x")
    assert _x(await a.claim_definitions(_claim(A, None))) == (A.path, "gw-a")
