"""An adapter the gateway loads takes a GPU slot in its shadow residency, as it does in the
replica: vLLM 0.32's ``add_adapter`` ends with ``activate_adapter`` (the simulated replica
does the same, 553baee). Checked against the simulated replica's engine after an admin
registration (``POST /admin/adapters``) and a request for another adapter, with the embedded
store and with Redis (the Lua transitions)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from shared_cluster import AUTH, MAX_LORAS, get_json, sdk, shared_config, twin_replicas

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_admin_load_takes_a_slot_as_in_the_replica(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state: dict[str, Any] = {"backend": "memory"}
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        state = {"backend": "redis", "redis_url": server.url, "key_prefix": "load-slot:"}
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 3))
        engine = replicas[0].state.engine
        cfg = shared_config(replicas, tmp_path, "redis://unused:1/0", 3, state=state)
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        client = await stack.enter_async_context(sdk(gw.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def shadow() -> Any:
            return (await get_json(http, gw.url + "/admin/replicas"))["replicas"][0]["residency"]

        for name in ("lora-0", "lora-1"):  # both slots taken, lora-0 the older
            await client.completions.create(model=name, prompt="x", max_tokens=1)
        write_adapter_folder(str(tmp_path / "lora-4"), rank=8)
        body = {"name": "lora-4", "path": str(tmp_path / "lora-4")}
        async with http.post(gw.url + "/admin/adapters", json=body, headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()
        # The load evicted the least recently used slot (lora-0), which stays cached.
        assert engine.gpu_adapters() == ["lora-1", "lora-4"]
        res = await shadow()
        assert res["gpu"] == ["lora-1", "lora-4"]
        assert res["cpu"] == ["lora-0", "lora-1", "lora-4"]

        # A request for lora-0 loads it back into a slot, evicting lora-1 (not lora-4).
        await client.completions.create(model="lora-0", prompt="x", max_tokens=1)
        assert len(engine.gpu_adapters()) == MAX_LORAS
        assert sorted(engine.gpu_adapters()) == ["lora-0", "lora-4"]
        res = await shadow()
        assert res["gpu"] == ["lora-4", "lora-0"]
        assert res["cpu"] == ["lora-1", "lora-4", "lora-0"]
