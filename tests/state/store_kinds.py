"""The three state stores the state tests run one test against: MemoryStore, a RedisStore on
the test's redis-server, and a ResilientStore around one (started, not degraded)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from loragate.state.keys import KeySpace, Ttls
from loragate.state.memory import MemoryStore
from loragate.state.redis_store import RedisStore
from loragate.state.resilient import ResilientStore
from loragate.state.store import StateStore
from redis_fixture import RedisServer

# A parametrized ``store`` fixture's params: ``store_of_kind(request)`` makes each.
STORE_KINDS = ("memory", "redis", "resilient")


@contextlib.asynccontextmanager
async def store_of_kind(
    request: pytest.FixtureRequest, *, ttls: Ttls | None = None
) -> AsyncIterator[StateStore]:
    """The store ``request.param`` names; a Redis one on the ``redis_server`` fixture's server
    (asked for only then), with a key prefix of its own, closed at the end."""
    if request.param == "memory":
        yield MemoryStore(ttls=ttls)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    remote = RedisStore.from_url(
        server.url, keys=KeySpace(prefix=f"s{uuid.uuid4().hex[:8]}:"), ttls=ttls, op_timeout_s=2.0
    )
    try:
        if request.param == "redis":
            yield remote
        else:
            resilient = ResilientStore(remote)
            await resilient.start()
            assert not resilient.degraded
            yield resilient
    finally:
        await remote.close()
