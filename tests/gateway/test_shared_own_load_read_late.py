"""A refresh of the shared view that read Redis before this instance's load was written there
(the read began first) replaces the mirror with a view lacking the load. The adapters
``sync_unloads`` hands the pool (``on_unloads``: ``ReplicaPool.forget_unloaded``) must not
include that load until a refresh begun after its write says it is gone (one real
redis-server).

Before: the load was handed at the next round (kept, being recent) and again at the round
after it with no refresh in between, when the pool dropped it: its next request for the
adapter was routed elsewhere and loaded it again (the flake of
``test_shared_delete_then_post``: ``assert pool1.is_registered(rid, name)``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

from loragate.core.clock import VirtualClock
from loragate.core.config import ReplicaConfig
from loragate.core.types import AdapterId, ReplicaId
from loragate.gateway.inflight import LocalInFlight
from loragate.gateway.shared import SharedState
from loragate.state.keys import KeySpace
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import StateView
from redis_fixture import RedisServer


async def test_a_load_written_after_a_refresh_read_is_not_handed_as_gone(
    redis_server: RedisServer,
) -> None:
    keys = KeySpace(prefix=f"o{uuid.uuid4().hex[:8]}:")
    clock = VirtualClock()
    remote = RedisStore.from_url(redis_server.url, keys=keys)
    other = ResilientStore(RedisStore.from_url(redis_server.url, keys=keys), clock=clock)
    store = ResilientStore(remote, clock=clock)
    shared = SharedState(store, LocalInFlight(["r1"]), backend="redis", clock=clock)
    handed: list[dict[ReplicaId, frozenset[AdapterId]]] = []

    def on_unloads(
        gone: Mapping[ReplicaId, frozenset[AdapterId]],
    ) -> Mapping[ReplicaId, frozenset[AdapterId]]:
        handed.append(dict(gone))
        return {}  # (the pool would keep a recent load once: here the test sees each hand)

    shared.on_unloads = on_unloads
    # A refresh whose read has been answered (before the load below was written) and whose
    # answer is applied only after it.
    read_done, apply = asyncio.Event(), asyncio.Event()
    real_snapshot = remote.snapshot

    async def held_snapshot(*, as_reader: bool = False) -> StateView:
        view = await real_snapshot(as_reader=as_reader)
        read_done.set()
        await apply.wait()
        return view

    try:
        await store.start()
        await other.start()
        await shared.register_replicas((ReplicaConfig(replica_id="r1", url="http://127.0.0.1:1"),))
        shared.sync_unloads()
        clock.advance_by(60.0)
        remote.snapshot = held_snapshot  # type: ignore[method-assign]
        refresh = asyncio.create_task(store.maintain())
        await read_done.wait()
        await shared.adapter_loaded("r1", "a")
        apply.set()
        await refresh
        remote.snapshot = real_snapshot  # type: ignore[method-assign]
        assert "a" not in shared.residency_of("r1").registered  # the late read's view
        for _ in range(3):  # rounds with no refresh between
            shared.sync_unloads()
        assert all("a" not in names for h in handed for names in h.values()), handed

        # A refresh begun after the write shows it: still nothing handed.
        clock.advance_by(60.0)
        await store.maintain()
        assert "a" in shared.residency_of("r1").registered
        shared.sync_unloads()
        assert all("a" not in names for h in handed for names in h.values()), handed

        # Another instance unloads it: the next refresh's round hands it.
        await other.record_unload("r1", "a")
        clock.advance_by(60.0)
        await store.maintain()
        shared.sync_unloads()
        assert handed[-1] == {"r1": frozenset({"a"})}, handed
    finally:
        await other.close()
        await store.close()
