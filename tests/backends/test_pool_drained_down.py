"""A drained replica going down is a planned restart: its poll failure is logged at INFO
("drained replica r0 is down (expected during a restart)"), an undrained one's still at WARNING
("replica r1 is unhealthy"); both leave the rotation alike. Two simulated replicas on loopback,
both stopped, then polled for real (connection refused)."""

from __future__ import annotations

import contextlib
import logging

import aiohttp
import pytest

from loragate.backends.pool import ReplicaPool
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.twin.replica_config import ReplicaConfig as SimulatedConfig
from loragate.twin.server import run_replica

SLOW_POLLS = PollerConfig(interval_s=3600.0, timeout_s=2.0, failures_to_unhealthy=1)


async def test_a_drained_replica_down_is_info_an_undrained_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.backends.pool")
    stacks = [contextlib.AsyncExitStack() for _ in range(2)]
    urls = []
    for i, stack in enumerate(stacks):
        config = SimulatedConfig(served_model_name="tiny-llama", seed=i)
        running = await stack.enter_async_context(run_replica(config, host="127.0.0.1", port=0))
        urls.append(running.url)
    pool = ReplicaPool(
        [ReplicaConfig(replica_id=f"r{i}", url=url) for i, url in enumerate(urls)],
        poller=SLOW_POLLS,
    )
    async with aiohttp.ClientSession() as session:
        await pool.start(session)
        try:
            assert pool.is_healthy("r0") and pool.is_healthy("r1")
            pool.set_draining(["r0"])
            for stack in stacks:
                await stack.aclose()  # both replicas stop: r0 as planned, r1 not
            caplog.clear()
            await pool.poll_once()
        finally:
            await pool.stop()
    assert not pool.is_healthy("r0") and not pool.is_healthy("r1")  # the same health state
    lines = {
        rec.getMessage().split(":")[0]: rec.levelname
        for rec in caplog.records
        if rec.name == "loragate.backends.pool"
    }
    assert lines.get("drained replica r0 is down (expected during a restart)") == "INFO", lines
    assert lines.get("replica r1 is unhealthy") == "WARNING", lines
    assert not any(
        rec.levelno >= logging.WARNING and "r0" in rec.getMessage() for rec in caplog.records
    ), caplog.text
