"""Drains and Redis outages, with gateway instances on one real redis-server in front of three
simulated replicas (the twin): an instance that starts while Redis is down cannot know the
drains kept there, says it is degraded meanwhile, and takes them up when Redis returns, with
its data kept or lost (another instance writes back the drains it knows)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from shared_cluster import (
    admin_call,
    eventually,
    get_json,
    routed_to,
    sdk,
    shared_config,
    twin_replicas,
)

from loragate.gateway import running_gateway
from redis_fixture import RedisServer

N_ADAPTERS = 1


@pytest.mark.parametrize("redis_keeps_its_data", [True, False], ids=["kept", "lost"])
async def test_an_instance_started_while_redis_is_down_takes_up_the_drains_when_it_returns(
    redis_server: RedisServer, tmp_path: Path, redis_keeps_its_data: bool
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 3, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS, routing="round_robin")
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        status, body = await admin_call(http, "POST", gw_a.url + "/admin/replicas/r0/drain")
        assert (status, body["draining"]) == (200, True), body

        # Redis goes away (its data saved, or lost as after a crash); B starts meanwhile.
        await asyncio.to_thread(redis_server.stop, save=redis_keeps_its_data)
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        client_b = await stack.enter_async_context(sdk(gw_b.url))
        health = await get_json(http, gw_b.url + "/health")
        assert (health["status"], health["state"]["degraded"]) == ("degraded", True), health
        assert health["state"]["synced"] is False, health

        await asyncio.to_thread(redis_server.start)

        async def b_r0() -> Any:
            return await get_json(http, gw_b.url + "/admin/replicas/r0")

        seen = await eventually(b_r0, lambda r: r["draining"], timeout_s=20.0)
        assert seen["draining"] is True, seen
        health = await get_json(http, gw_b.url + "/health")
        assert (health["status"], health["replicas_draining"]) == ("ok", 1), health
        assert health["state"]["synced"] is True, health
        assert sorted({await routed_to(client_b) for _ in range(6)}) == ["r1", "r2"]
