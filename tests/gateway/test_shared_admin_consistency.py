"""The adapter registry stays one across gateway instances on one real redis-server.

* ``POST /admin/adapters`` of a name the store already holds is a 409 even when this
  instance's local view has not seen it yet (the store's put is conditional).
* ``DELETE`` leaves a tombstone: an instance whose view is stale may load the deleted adapter
  back on a replica on demand, and an instance that sees the tombstone unloads it there (but
  never an adapter loaded on the replica outside loragate).
* While the state store is degraded (Redis down) admin writes are refused with a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import openai
from shared_cluster import AUTH, eventually, get_json, sdk, shared_config, twin_replicas

from loragate.core.config import GatewayConfig
from loragate.core.types import AdapterSpec
from loragate.gateway import running_gateway
from loragate.state import KeySpace, RedisStore
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer

N_ADAPTERS = 2
# An instance whose local view is never refreshed during a test (a stale instance).
STALE_REFRESH_S = 3600.0


def _with_refresh(cfg: GatewayConfig, refresh_s: float) -> GatewayConfig:
    return dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, refresh_s=refresh_s))


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + "/admin/adapters", json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _delete(http: aiohttp.ClientSession, url: str, name: str) -> tuple[int, Any]:
    async with http.delete(f"{url}/admin/adapters/{name}", headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _listed(http: aiohttp.ClientSession, replica_url: str) -> set[str]:
    async with http.get(replica_url + "/v1/models") as resp:
        data = await resp.json()
    return {m["id"] for m in data["data"] if m.get("parent")}


async def test_post_of_a_name_the_store_holds_is_409_whatever_the_local_view(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, N_ADAPTERS))
        cfg = _with_refresh(
            shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS), STALE_REFRESH_S
        )
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # Another instance registers "new" a moment ago: this one has not refreshed since.
        other = RedisStore.from_url(redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix))
        stack.push_async_callback(other.close)
        first = AdapterSpec(name="new", path=str(tmp_path / "lora-0"), rank=8)
        await other.put_adapter(first)
        assert "new" not in gw.gateway.shared.shared_adapters()

        status, body = await _post(http, gw.url, {"name": "new", "path": str(tmp_path / "x")})
        assert status == 409, body
        assert body["error"]["code"] == "conflict"
        assert body["error"]["param"] == "name"
        # The first registration stands.
        assert [a.path for a in await other.list_adapters()] == [first.path]


async def test_concurrent_posts_of_one_name_to_two_instances_one_wins(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, N_ADAPTERS))
        cfg = _with_refresh(
            shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS), STALE_REFRESH_S
        )
        gws = [await stack.enter_async_context(running_gateway(cfg, port=0)) for _ in range(2)]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        for i in range(5):
            name = f"race-{i}"
            answers = await asyncio.gather(
                *(
                    _post(http, gw.url, {"name": name, "path": str(tmp_path / f"lora-{k}")})
                    for k, gw in enumerate(gws)
                )
            )
            assert sorted(status for status, _ in answers) == [201, 409], answers
            winner = next(body for status, body in answers if status == 201)
            probe = RedisStore.from_url(
                redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix)
            )
            try:
                stored = {a.name: a.path for a in await probe.list_adapters()}
            finally:
                await probe.close()
            assert stored[name] == winner["path"]


async def test_delete_unloads_what_a_stale_instance_loaded_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        write_adapter_folder(str(tmp_path / "tmp-a"), rank=8)
        write_adapter_folder(str(tmp_path / "ext"), rank=8)
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # An adapter an operator loaded on replica 0 outside loragate: never unloaded by it.
        async with http.post(
            replicas[0].url + "/v1/load_lora_adapter",
            json={"lora_name": "ext", "lora_path": str(tmp_path / "ext")},
        ) as resp:
            assert resp.status == 200, await resp.text()
        tmp_a = {"name": "tmp-a", "path": str(tmp_path / "tmp-a")}
        status, body = await _post(http, gw_a.url, tmp_a)
        assert status == 201, body
        # Instance B starts knowing "tmp-a", then never refreshes its view (stale).
        gw_b = await stack.enter_async_context(
            running_gateway(_with_refresh(cfg, STALE_REFRESH_S), port=0)
        )
        assert "tmp-a" in gw_b.gateway.catalog.adapters
        client_b = await stack.enter_async_context(sdk(gw_b.url))
        await client_b.completions.create(model="tmp-a", prompt="x", max_tokens=2)

        status, body = await _delete(http, gw_a.url, "tmp-a")
        assert status == 200, body
        # B has (usually) not seen the deletion: it serves "tmp-a" again, loading it back on
        # demand. (Its view can catch up first, e.g. when its poll sees A unload it: then it
        # answers 404, and what follows must hold all the same.)
        served = 0
        for _ in range(2):
            try:
                await client_b.completions.create(model="tmp-a", prompt="x", max_tokens=2)
            except openai.NotFoundError:
                break
            served += 1
        if served:
            assert gw_b.gateway.pool.is_registered(
                "r0", "tmp-a"
            ) or gw_b.gateway.pool.is_registered("r1", "tmp-a")

        async def holders() -> list[set[str]]:
            return [await _listed(http, r.url) for r in replicas]

        # A's poller sees the tombstone and unloads it wherever a replica lists it.
        seen = await eventually(holders, lambda hs: all("tmp-a" not in h for h in hs))
        assert all("tmp-a" not in h for h in seen), seen
        # ... and leaves alone what the operator loaded outside loragate.
        assert "ext" in seen[0]


async def test_admin_writes_while_the_store_is_degraded_are_503(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        status, body = await _post(http, gw.url, {"name": "dyn", "path": str(tmp_path / "lora-0")})
        assert status == 201, body

        async def health() -> str:
            return str((await get_json(http, gw.url + "/health"))["status"])

        await asyncio.to_thread(redis_server.stop)
        assert await eventually(health, lambda s: s == "degraded") == "degraded"

        status, body = await _post(http, gw.url, {"name": "dyn2", "path": str(tmp_path / "x")})
        assert status == 503, body
        assert body["error"]["code"] == "state_unavailable"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        status, body = await _delete(http, gw.url, "dyn")
        assert status == 503, body
        assert body["error"]["code"] == "state_unavailable"
        # Nothing changed locally either: "dyn" is still served, "dyn2" is not.
        assert "dyn" in gw.gateway.catalog.adapters
        assert "dyn2" not in gw.gateway.catalog.adapters


async def test_a_catalog_miss_finds_an_adapter_registered_elsewhere_a_moment_ago(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, N_ADAPTERS))
        cfg = _with_refresh(
            shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS), STALE_REFRESH_S
        )
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        other = RedisStore.from_url(redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix))
        stack.push_async_callback(other.close)
        spec = AdapterSpec(name="late", path=str(tmp_path / "lora-1"), rank=8)
        assert await other.put_adapter(spec)
        shared = gw.gateway.shared
        assert "late" not in gw.gateway.catalog.adapters  # this instance has not refreshed
        assert await shared.find_adapter("nope") is None
        assert await shared.find_adapter("late") == spec
        # Adopted at once: the catalog serves it, and the pool expects it from its path.
        assert gw.gateway.catalog.resolve("late", None) == spec
