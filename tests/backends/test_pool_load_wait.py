"""ReplicaPool.ensure_adapter's ``timeout_s``: a request waits for an adapter load no longer
than it may (what is left of its request_timeout_s), while the shared load itself goes on
(up to admin_timeout_s) for the other waiters."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from loragate.backends.pool import ReplicaPool
from loragate.core.config import PollerConfig, ReplicaConfig
from loragate.core.errors import UpstreamTimeoutError
from loragate.core.types import AdapterSpec
from vllm_stub import StubVllm


async def test_a_waiter_gives_up_at_its_timeout_and_the_load_goes_on(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    stub_vllm.load_delay_s = 0.5  # the replica answers the load late
    pool = ReplicaPool(
        [ReplicaConfig(replica_id="r0", url=stub_vllm.url)],
        poller=PollerConfig(interval_s=3600.0, timeout_s=2.0),
        admin_timeout_s=30.0,
    )
    await pool.start(session)
    spec = AdapterSpec(name="lora-0", path="/loras/lora-0")
    try:
        patient = asyncio.create_task(pool.ensure_adapter("r0", spec))
        with pytest.raises(UpstreamTimeoutError) as raised:
            await pool.ensure_adapter("r0", spec, timeout_s=0.05)
        assert raised.value.message == (
            "loading adapter lora-0 on replica r0 did not finish within 0.05 s "
            "(the load goes on, up to 30 s)"
        )
        assert pool.loading("r0") == {"lora-0"}  # not cancelled with the waiter that gave up
        assert await patient is True
        assert stub_vllm.load_calls == 1 and pool.is_registered("r0", "lora-0")
        # Nothing left to wait for: a timeout of 0 does not matter.
        assert await pool.ensure_adapter("r0", spec, timeout_s=0.0) is False
    finally:
        await pool.stop()
