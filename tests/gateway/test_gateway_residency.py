"""Shadow residency in the gateway (embedded store) in front of simulated replicas: replica
settings discovered from ``/metrics``, the registered set reconciled with ``/v1/models``."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
from gateway_harness import ScriptedReplica, gateway_config
from shared_cluster import MAX_LORAS, eventually, get_json, sdk, shared_config, twin_replicas

from loragate.gateway import running_gateway

N_ADAPTERS = 4


async def test_discovered_settings_and_reconciled_registrations(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, N_ADAPTERS))
        cfg = shared_config(
            replicas,
            tmp_path,
            "redis://unused:1/0",
            N_ADAPTERS,
            # No settings: max_loras comes from vllm:lora_requests_info's max_lora label.
            replicas=[{"id": "r0", "url": replicas[0].url}],
            state={"backend": "memory"},
            poller={"interval_s": 0.1},
        )
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        client = await stack.enter_async_context(sdk(gw.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def replica() -> Any:
            return (await get_json(http, gw.url + "/admin/replicas"))["replicas"][0]

        # vLLM shows the max_lora label once a LoRA request was seen.
        await client.completions.create(model="lora-0", prompt="x", max_tokens=1)
        rep = await eventually(replica, lambda r: r["settings"]["max_loras"] == MAX_LORAS)
        assert rep["settings"]["max_loras"] == MAX_LORAS  # the replica's, not the default 4
        for n in range(N_ADAPTERS):
            await client.completions.create(model=f"lora-{n}", prompt="x", max_tokens=1)
        rep = await replica()
        names = [f"lora-{n}" for n in range(N_ADAPTERS)]
        # The shadow GPU slots hold the last max_loras adapters routed, most recent last.
        assert rep["residency"]["gpu"] == names[-MAX_LORAS:]
        assert rep["residency"]["registered"] == names

        # Someone else unloads lora-0 and loads an adapter the gateway never routed.
        base = replicas[0].url
        async with http.post(base + "/v1/unload_lora_adapter", json={"lora_name": "lora-0"}) as r:
            assert r.status == 200
        other = {"lora_name": "outsider", "lora_path": str(tmp_path / "lora-1")}
        async with http.post(base + "/v1/load_lora_adapter", json=other) as r:
            assert r.status == 200
        expected = sorted(["outsider", *names[1:]])
        rep = await eventually(replica, lambda r: r["residency"]["registered"] == expected)
        assert rep["residency"]["registered"] == expected
        assert "lora-0" not in rep["residency"]["cpu"]


async def test_a_load_spanning_polls_keeps_the_routed_adapter_in_its_gpu_slot(
    replicas: list[ScriptedReplica],
) -> None:
    """A slow admin load spans several polls of ``/v1/models``, which cannot list the adapter
    yet: they must not drop it from the shadow residency (the request was routed and runs)."""
    rep = replicas[0]
    rep.load_delay_s = 0.6  # ~12 polls run while the load is in progress
    cfg = gateway_config([rep.url], poller={"interval_s": 0.05})
    async with running_gateway(cfg, port=0) as gw, sdk(gw.url) as client:
        done = await client.completions.create(model="lora-2", prompt="p", max_tokens=2)
        assert done.model == "lora-2"
        assert rep.load_calls == 1
        await asyncio.sleep(0.3)  # polls after the load list it: nothing to change
        res = gw.gateway.shared.residency_of("r0")
        assert "lora-2" in res.registered
        assert res.gpu[-1:] == ("lora-2",)  # the routed request made it the newest slot
        assert res.cpu[-1:] == ("lora-2",)
