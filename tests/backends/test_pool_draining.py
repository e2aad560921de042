"""ReplicaPool.set_draining: drained replicas leave the replicas that may get traffic, are still
polled, and the no-replica error says when draining is why. Real polls of stubs on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from loragate.backends.pool import ReplicaPool
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.errors import NoReplicaAvailableError
from vllm_stub import StubVllm

SLOW_POLLS = PollerConfig(interval_s=3600.0, timeout_s=2.0, failures_to_unhealthy=1)


@pytest.fixture
async def pool(
    stub_pair: tuple[StubVllm, StubVllm, list[web.AppRunner]],
) -> AsyncIterator[ReplicaPool]:
    first, second, _ = stub_pair
    replicas = [ReplicaConfig(replica_id=f"r{i}", url=s.url) for i, s in enumerate((first, second))]
    pool = ReplicaPool(replicas, poller=SLOW_POLLS)
    async with aiohttp.ClientSession() as session:
        await pool.start(session)
        try:
            yield pool
        finally:
            await pool.stop()


def _routable(pool: ReplicaPool) -> list[str]:
    return [s.replica_id for s in pool.healthy_snapshots()]


async def test_drained_replicas_get_no_traffic_and_are_still_polled(
    pool: ReplicaPool, stub_pair: tuple[StubVllm, StubVllm, list[web.AppRunner]]
) -> None:
    first, _, _ = stub_pair
    assert _routable(pool) == ["r0", "r1"]
    pool.set_draining(["r0", "elsewhere"])  # an id this pool lacks is no error
    assert _routable(pool) == ["r1"]
    assert (pool.is_draining("r0"), pool.is_draining("r1")) == (True, False)
    assert not pool.is_draining("elsewhere")
    assert pool.is_healthy("r0")  # drained, not unhealthy

    first.adapters["x"] = "/loras/x"
    first.health_status = 503
    await pool.poll_once()
    assert not pool.is_healthy("r0")  # polled while drained
    first.health_status = 200
    await pool.poll_once()
    assert pool.is_healthy("r0") and pool.is_registered("r0", "x")
    assert _routable(pool) == ["r1"]

    pool.set_draining([])
    assert _routable(pool) == ["r0", "r1"]


async def test_the_no_replica_error_says_which_replicas_drain(
    pool: ReplicaPool, stub_pair: tuple[StubVllm, StubVllm, list[web.AppRunner]]
) -> None:
    _, second, _ = stub_pair
    pool.set_draining(["r0", "r1"])
    with pytest.raises(NoReplicaAvailableError) as info:
        pool.require_healthy()
    assert info.value.message.startswith("no replica is available: every replica is draining")
    assert "(r0, r1)" in info.value.message
    assert info.value.param == "model"

    second.health_status = 503
    await pool.poll_once()
    pool.set_draining(["r0"])
    message = pool.no_replica_error().message
    assert "r0 is draining and the others are unhealthy" in message, message

    pool.set_draining([])
    pool.report_failure("r0", "connection refused")
    assert pool.no_replica_error().message == "no healthy replica is available"


async def test_a_replica_removed_and_added_back_is_drained_still(
    pool: ReplicaPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The drain is the shared state's (other instances may still route there): leaving this
    pool does not end it, and the replica added back under its id gets no traffic."""
    pool.set_draining(["r1"])
    pool.remove_replica("r1")
    assert not pool.is_draining("r1")  # not in the pool
    assert pool.add_replicas([ReplicaConfig(replica_id="r1", url="http://127.0.0.1:9")])
    assert pool.is_draining("r1")
    assert "replica r1 (http://127.0.0.1:9) is added drained" in caplog.text
    pool.set_draining([])
    assert not pool.is_draining("r1")
