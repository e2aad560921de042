"""A load the replica answers "already loaded" (vLLM 0.32's 400 for a name registered there)
did nothing there: vLLM returns before ``add_lora``, so the adapter is not activated and takes
no GPU slot. The shadow residency must not record one either (it recorded a load: the adapter
in a slot, evicting the least recently used one, which vLLM still holds). Checked against the
simulated replica's engine, with the embedded store and with Redis, after an admin
registration (``POST /admin/adapters``) of an adapter loaded on the replica by hand after the
gateway's last poll."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from shared_cluster import AUTH, get_json, sdk, shared_config, twin_replicas

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_already_loaded_answer_takes_no_slot_in_the_shadow(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    state: dict[str, Any] = {"backend": "memory"}
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        state = {"backend": "redis", "redis_url": server.url, "key_prefix": "already-loaded:"}
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 2))
        replica = replicas[0]
        engine = replica.state.engine
        cfg = shared_config(
            replicas, tmp_path, "redis://unused:1/0", 2, state=state,
            poller={"interval_s": 3600},  # no poll after the start's: the shadow is the test's
        )  # fmt: skip
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        client = await stack.enter_async_context(sdk(gw.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def shadow() -> Any:
            return (await get_json(http, gw.url + "/admin/replicas"))["replicas"][0]["residency"]

        # lora-9 is loaded on the replica by hand (not through the gateway): vLLM activates it.
        path = str(tmp_path / "lora-9")
        write_adapter_folder(path, rank=8)
        body = {"lora_name": "lora-9", "lora_path": path}
        async with http.post(replica.url + "/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 200, await resp.text()
        # Two requests take both slots: lora-9 leaves its slot, it stays cached.
        for name in ("lora-0", "lora-1"):
            await client.completions.create(model=name, prompt="x", max_tokens=1)
        assert engine.gpu_adapters() == ["lora-0", "lora-1"]
        assert (await shadow())["gpu"] == ["lora-0", "lora-1"]

        # The admin registration's load is answered "already loaded": nothing moves there.
        registration = {"name": "lora-9", "path": path}
        async with http.post(gw.url + "/admin/adapters", json=registration, headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()
        assert engine.gpu_adapters() == ["lora-0", "lora-1"]
        res = await shadow()
        assert res["gpu"] == ["lora-0", "lora-1"]
        assert "lora-9" not in res["cpu"]
        # The gateway loaded nothing there.
        assert await _loads(http, gw.url) == "2.0"

        # A request for lora-9 activates it (the replica and the shadow alike), with no load.
        await client.completions.create(model="lora-9", prompt="x", max_tokens=1)
        assert engine.gpu_adapters() == ["lora-1", "lora-9"]
        res = await shadow()
        assert res["gpu"] == ["lora-1", "lora-9"]
        assert await _loads(http, gw.url) == "2.0"


async def _loads(http: aiohttp.ClientSession, url: str) -> str:
    """loragate_adapter_loads_total of r0, as /metrics writes it."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    prefix = 'loragate_adapter_loads_total{replica="r0"} '
    return next(line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix))
