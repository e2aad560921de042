"""Two gateway instances on one real redis-server, in front of two simulated replicas: they
route as one (shared in-flight counts and shadow residency, shared adapter registry)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
from shared_cluster import (
    AUTH,
    BASE,
    MAX_CPU_LORAS,
    MAX_LORAS,
    eventually,
    get_json,
    sdk,
    shared_config,
    twin_replicas,
)

from loragate.core.types import ReplicaSettings, Residency
from loragate.gateway import running_gateway
from loragate.state import residency as rz
from redis_fixture import RedisServer

N_ADAPTERS = 4


def _in_flight(view: Any) -> dict[str, int]:
    return {r["id"]: r["in_flight"] for r in view["replicas"]}


def _residency(view: Any) -> dict[str, Any]:
    return {r["id"]: r["residency"] for r in view["replicas"]}


async def test_two_instances_share_in_flight_residency_and_adapters(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gws = [await stack.enter_async_context(running_gateway(cfg, port=0)) for _ in range(2)]
        clients = [await stack.enter_async_context(sdk(gw.url)) for gw in gws]
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def views() -> list[Any]:
            return [await get_json(http, gw.url + "/admin/replicas") for gw in gws]

        # 1. Long streams through both instances, held open: every instance counts them all.
        streams = []
        expected = {"r0": 0, "r1": 0}
        for i in range(6):
            raw = await clients[i % 2].completions.with_raw_response.create(
                model=BASE, prompt="hold", max_tokens=3000, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            expected[raw.headers["x-loragate-replica"]] += 1
            stream = raw.parse()
            await stream.__aiter__().__anext__()  # the stream is flowing
            streams.append(stream)
            # Both instances see every stream opened so far before the next one is routed.
            opened = sum(expected.values())
            await eventually(
                views, lambda vs, n=opened: all(sum(_in_flight(v).values()) == n for v in vs)
            )
        seen = await eventually(views, lambda vs: all(_in_flight(v) == expected for v in vs))
        assert [_in_flight(v) for v in seen] == [expected, expected]
        # least_loaded on shared counts spreads them (each instance alone would not know).
        assert sorted(expected.values()) == [3, 3]
        for stream in streams:
            await stream.close()  # client goes away: the gateway aborts and releases
        zero = {"r0": 0, "r1": 0}
        seen = await eventually(views, lambda vs: all(_in_flight(v) == zero for v in vs))
        assert [_in_flight(v) for v in seen] == [zero, zero]

        # 2. Adapter requests, alternating instances: one shared LRU model per replica.
        routed: dict[str, list[str]] = {"r0": [], "r1": []}
        for i, n in enumerate([0, 1, 2, 0, 3, 1, 2, 2, 0, 3, 1, 0]):
            raw = await clients[i % 2].completions.with_raw_response.create(
                model=f"lora-{n}", prompt="x", max_tokens=2
            )
            routed[raw.headers["x-loragate-replica"]].append(f"lora-{n}")
        settings = ReplicaSettings(max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS)
        model: dict[str, Any] = {}
        for rid, adapters in routed.items():
            res = Residency()
            for adapter in adapters:
                res = rz.touch(res, adapter, settings)
            model[rid] = {
                "registered": sorted(res.registered),
                "gpu": list(res.gpu),
                "cpu": list(res.cpu),
            }
        seen = await eventually(views, lambda vs: all(_residency(v) == model for v in vs))
        assert _residency(seen[0]) == _residency(seen[1]) == model
        assert all(routed.values())  # both replicas got adapter traffic

        # 3. An adapter registered on one instance is served by the other.
        write_adapter_folder_path = tmp_path / "lora-0"  # any valid adapter folder
        body = {"name": "late", "path": str(write_adapter_folder_path), "rank": 8}
        async with http.post(gws[0].url + "/admin/adapters", headers=AUTH, json=body) as resp:
            assert resp.status == 201

        async def other_models() -> list[str]:
            page = await clients[1].models.list()
            return [m.id for m in page.data]

        names = await eventually(other_models, lambda ids: "late" in ids)
        assert "late" in names
        done = await clients[1].completions.create(model="late", prompt="x", max_tokens=2)
        assert done.model == "late"
