"""Fixtures of the state tests: stores on a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from loragate.state.keys import KeySpace, Ttls
from loragate.state.redis_store import RedisStore
from redis_fixture import RedisServer

StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def redis_stores(redis_server: RedisServer) -> AsyncIterator[StoreFactory]:
    """Make RedisStores on the test's redis-server, sharing one key prefix; closed at the end."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    made: list[RedisStore] = []

    def make(
        *, ttls: Ttls | None = None, instance_id: str | None = None, op_timeout_s: float = 2.0
    ) -> RedisStore:
        store = RedisStore.from_url(
            redis_server.url,
            keys=KeySpace(prefix=prefix),
            ttls=ttls,
            instance_id=instance_id,
            op_timeout_s=op_timeout_s,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
