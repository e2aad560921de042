"""``state.demand_retention_s``: how long the per-adapter demand buckets (one per 10 s; on Redis
one hash ``P demand:<bucket>`` each, written on every request) are kept. Before, it was fixed
at 24 h (8,640 keys on Redis) and the key was refused as unknown.

Stores built from a config file as ``loragate serve`` builds them: the embedded memory store
(old buckets forgotten) and the Redis one against a real redis-server (the key's TTL)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from loragate.core.errors import ConfigError
from loragate.core.types import ReplicaSettings
from loragate.gateway.config_file import parse_config_text
from loragate.gateway.shared import build_store
from loragate.state import ResilientStore
from loragate.state.store import ReplicaRecord
from redis_fixture import RedisServer


def _config(state: str) -> str:
    return f"""\
base_model: m
replicas: ["http://127.0.0.1:1"]
state:
{state}"""


async def test_the_memory_store_keeps_demand_for_the_retention() -> None:
    store = build_store(parse_config_text(_config("  demand_retention_s: 60\n")).state)
    await store.begin_request("r1", "a", "q1", 0.0)
    await store.begin_request("r1", "a", "q2", 100.0)
    assert await store.demand(0.0, 110.0) == {100.0: {"a": 1}}  # bucket 0 is past 60 s
    default = build_store(parse_config_text(_config("  backend: memory\n")).state)
    await default.begin_request("r1", "a", "q1", 0.0)
    await default.begin_request("r1", "a", "q2", 100.0)
    assert await default.demand(0.0, 110.0) == {0.0: {"a": 1}, 100.0: {"a": 1}}  # a day


async def test_the_redis_demand_keys_expire_after_the_retention(redis_server: RedisServer) -> None:
    state = f"  backend: redis\n  redis_url: {redis_server.url}\n  key_prefix: 't-demand:'\n"
    store = build_store(parse_config_text(_config(state + "  demand_retention_s: 60\n")).state)
    assert isinstance(store, ResilientStore)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.start()
        assert not store.degraded
        await store.upsert_replica(
            ReplicaRecord(
                replica_id="r1",
                url="http://r1:8000",
                settings=ReplicaSettings(max_loras=2, max_cpu_loras=3),
                updated_s=1.0,
            )
        )
        await store.begin_request("r1", "a", "q1", 1000.0)
        assert not store.degraded
        ttl = await client.ttl("t-demand:demand:100")  # bucket 1000 s // 10 s
        assert 0 < ttl <= 70, ttl  # retention + one bucket, not a day (86,410 s)
    finally:
        await store.close()
        await client.aclose()


@pytest.mark.parametrize("value", ["0", "-5", "'a day'"])
def test_a_retention_that_is_not_a_positive_number_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(_config(f"  demand_retention_s: {value}\n"))
    assert info.value.key == "state.demand_retention_s"
