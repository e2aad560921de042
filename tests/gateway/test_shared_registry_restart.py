"""A deletion made through one instance's admin API survives a Redis restart that lost the
data, with two gateway instances on one real redis-server: the instance whose view predates
the deletion writes its view back, but not the deleted adapter (the deleter writes the
tombstone back), whichever instance is back first."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import aiohttp
import openai
import pytest
from shared_cluster import AUTH, eventually, sdk, shared_config, twin_replicas

from loragate.core.config import GatewayConfig
from loragate.gateway import running_gateway
from loragate.state import KeySpace, RedisStore
from redis_fixture import RedisServer

N_ADAPTERS = 1
STALE_REFRESH_S = 3600.0  # an instance whose view is never refreshed during the test


def _with_refresh(cfg: GatewayConfig, refresh_s: float) -> GatewayConfig:
    return dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, refresh_s=refresh_s))


async def test_a_deleted_adapter_stays_deleted_after_redis_comes_back_empty(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        body = {"name": "tmp", "path": str(tmp_path / "lora-0")}
        async with http.post(gw_a.url + "/admin/adapters", json=body, headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()
        # B starts knowing "tmp" and does not refresh its view afterwards.
        gw_b = await stack.enter_async_context(
            running_gateway(_with_refresh(cfg, STALE_REFRESH_S), port=0)
        )
        assert "tmp" in gw_b.gateway.catalog.adapters
        async with http.delete(gw_a.url + "/admin/adapters/tmp", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
        assert "tmp" in gw_b.gateway.shared.shared_adapters()  # B's view predates it

        await asyncio.to_thread(redis_server.stop)  # data lost, as after a crash
        client_b = await stack.enter_async_context(sdk(gw_b.url))
        await client_b.completions.create(model="lora-0", prompt="x", max_tokens=2)
        shared_a, shared_b = gw_a.gateway.shared, gw_b.gateway.shared

        async def degraded() -> tuple[bool, bool]:
            return shared_a.degraded, shared_b.degraded

        assert await eventually(degraded, lambda d: all(d)) == (True, True)
        await asyncio.to_thread(redis_server.start)  # empty
        # Both write their views back (backoff up to ~6 s: a bound, not a timing assert).
        assert await eventually(degraded, lambda d: not any(d), timeout_s=30.0) == (
            False,
            False,
        )

        probe = RedisStore.from_url(redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix))
        stack.push_async_callback(probe.close)
        raw = await probe.snapshot()
        assert "tmp" not in raw.adapters, raw.adapters
        assert "tmp" in raw.tombstones  # every poller still unloads it where listed
        # B's own view follows Redis at its next refresh (never, in this test: which of the two
        # resynced first decides whether it already has); an instance that reads Redis now does
        # not serve the deleted adapter.
        gw_c = await stack.enter_async_context(running_gateway(cfg, port=0))
        assert "tmp" not in gw_c.gateway.shared.shared_adapters()
        assert "tmp" not in gw_c.gateway.catalog.adapters
        client_c = await stack.enter_async_context(sdk(gw_c.url))
        with pytest.raises(openai.NotFoundError):
            await client_c.completions.create(model="tmp", prompt="x", max_tokens=2)
