"""``state.tombstone_ttl_s`` sets how long a deleted adapter stays tombstoned, on a real
redis-server and in the embedded store: an operator whose real vLLM loads take long sets it
above the 30 s default."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from gateway_harness import gateway_config as scripted_config
from gateway_harness import picky_replicas
from shared_cluster import AUTH, TOKEN, shared_config, twin_replicas

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer

TTL_S = 600.0  # far above the default: what is left of it after the DELETE tells which held


async def _register_and_delete(url: str, name: str, path: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(url + "/admin/adapters", json={"name": name, "path": path}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.delete(f"{url}/admin/adapters/{name}") as resp:
            assert resp.status == 200, await resp.text()


async def test_redis_tombstones_last_as_long_as_the_config_says(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    state: dict[str, Any] = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "key_prefix": prefix,
        "refresh_s": 0.05,
        "tombstone_ttl_s": TTL_S,
    }
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 1))
        write_adapter_folder(str(tmp_path / "gone"), rank=8)
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1, state=state)
        assert cfg.state.tombstone_ttl_s == TTL_S
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        await _register_and_delete(gw.url, "gone", str(tmp_path / "gone"))
        client = aioredis.Redis.from_url(redis_server.url)
        stack.push_async_callback(client.aclose)
        until_ms = int(await client.hget(f"{prefix}tombstones", "gone"))
        secs, micros = await client.time()
        left_s = (until_ms - (secs * 1000 + micros // 1000)) / 1000
        assert 30.0 < left_s <= TTL_S, left_s  # the default would have left at most 30 s
        assert 30.0 < gw.gateway.shared.store.tombstones()["gone"] <= TTL_S


async def test_embedded_store_tombstones_last_as_long_as_the_config_says() -> None:
    async with picky_replicas() as replicas:
        cfg = scripted_config(
            [r.url for r in replicas],
            admin={"token": TOKEN},
            poller={"interval_s": 0.5},  # the harness's 3600 s is above any sensible tombstone
            state={"tombstone_ttl_s": TTL_S},
        )
        async with running_gateway(cfg, port=0) as gw:
            await _register_and_delete(gw.url, "gone", "/loras/gone")
            assert 30.0 < gw.gateway.shared.store.tombstones()["gone"] <= TTL_S
