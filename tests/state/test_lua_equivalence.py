"""The Lua residency transitions in Redis equal the pure Python ones, step by step."""

from __future__ import annotations

import random
from collections.abc import Callable

from loragate.core.types import ReplicaSettings
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.store import ReplicaRecord, StateStore

StoreFactory = Callable[..., RedisStore]

ADAPTERS = [f"a{i}" for i in range(10)]


async def _random_ops(rng: random.Random, stores: list[StateStore], steps: int) -> None:
    replicas = {
        "r0": ReplicaSettings(max_loras=1, max_cpu_loras=2),
        "r1": ReplicaSettings(max_loras=2, max_cpu_loras=4),
        "r2": ReplicaSettings(max_loras=3, max_cpu_loras=3),
        "r3": ReplicaSettings(max_loras=4, max_cpu_loras=2),  # normalised to 4/4
    }
    for store in stores:
        for r, s in replicas.items():
            await store.upsert_replica(ReplicaRecord(replica_id=r, url=r, settings=s))
    open_requests: list[tuple[str, str]] = []
    for step in range(steps):
        r = rng.choice(list(replicas))
        a = rng.choice(ADAPTERS)
        x = rng.random()
        for store in stores:
            if x < 0.6:
                await store.begin_request(r, a, f"q{step}", float(step))
            elif x < 0.7 and open_requests:
                rr, q = open_requests[0]
                await store.end_request(rr, q)
            elif x < 0.8:
                await store.record_load(r, a)
            elif x < 0.9:
                await store.record_unload(r, a)
            elif x < 0.95:
                await store.reconcile(r, frozenset(random.Random(step).sample(ADAPTERS, 6)))
            else:
                # settings change mid-run (e.g. discovered after a replica restart)
                s = ReplicaSettings(max_loras=1 + step % 3, max_cpu_loras=2 + step % 4)
                await store.upsert_replica(ReplicaRecord(replica_id=r, url=r, settings=s))
        if x < 0.6:
            open_requests.append((r, f"q{step}"))
        elif x < 0.7 and open_requests:
            open_requests.pop(0)
        views = [await s.snapshot() for s in stores]
        assert views[1].residency == views[0].residency, f"step {step}"
        assert views[1].in_flight == views[0].in_flight, f"step {step}"
    assert any(len(v.gpu) > 1 for v in views[0].residency.values())


async def test_redis_residency_equals_python(redis_stores: StoreFactory) -> None:
    await _random_ops(random.Random(1234), [MemoryStore(), redis_stores()], steps=400)
