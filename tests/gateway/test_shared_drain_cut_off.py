"""A gateway instance cut off from Redis while another drains a replica: it cannot learn the
drain, keeps routing there, and its requests there are not counted in the shared in-flight
count, so ``in_flight: 0`` alone would let an operator restart a replica that still gets
traffic. The draining instance names it under ``drain_not_seen_by`` until it has read the
shared state again. Two instances on one real redis-server, the second one through a TCP
relay on loopback that the test cuts and restores; three simulated replicas (the twin)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import openai
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
from loragate.gateway.runner import RunningGateway
from loragate.state import ResilientStore
from redis_fixture import RedisServer
from tcp_relay import relay_to


async def _routed(client: openai.AsyncOpenAI, n: int) -> set[str]:
    return {await routed_to(client) for _ in range(n)}


def _instance(gw: RunningGateway) -> str:
    store = gw.gateway.shared.store
    assert isinstance(store, ResilientStore)
    return store.remote.instance_id


async def test_an_instance_cut_off_from_redis_is_named_as_not_having_seen_the_drain(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 3, 0))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 0, routing="round_robin")
        relay = await stack.enter_async_context(relay_to(redis_server.port))
        state_b = dataclasses.replace(cfg.state, redis_url=f"redis://127.0.0.1:{relay.port}/0")
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        # An instance that stops (gracefully) is no longer one that may miss a drain.
        async with running_gateway(cfg, port=0) as gw_gone:
            gone = _instance(gw_gone)
        gw_b = await stack.enter_async_context(
            running_gateway(dataclasses.replace(cfg, state=state_b), port=0)
        )
        client_b = await stack.enter_async_context(sdk(gw_b.url))
        b = _instance(gw_b)

        async def a_r0() -> Any:
            return await get_json(http, gw_a.url + "/admin/replicas/r0")

        # B is cut off from Redis; A drains r0.
        await relay.cut()
        health = await eventually(
            lambda: get_json(http, gw_b.url + "/health"), lambda h: h["state"]["degraded"]
        )
        assert health["status"] == "degraded", health
        status, body = await admin_call(http, "POST", gw_a.url + "/admin/replicas/r0/drain")
        assert (status, body["draining"]) == (200, True), body
        assert [x["instance"] for x in body["drain_not_seen_by"]] == [b], body
        assert gone not in {x["instance"] for x in body["drain_not_seen_by"]}
        # B routes to r0 still (it cannot know), and A's count of r0 misses those requests.
        assert "r0" in await _routed(client_b, 3)
        seen = await a_r0()
        assert (seen["in_flight"], [x["instance"] for x in seen["drain_not_seen_by"]]) == (0, [b])

        # Back in touch: B takes the drain up; A no longer names it.
        await relay.restore()
        seen = await eventually(a_r0, lambda r: not r["drain_not_seen_by"], timeout_s=20.0)
        assert seen["drain_not_seen_by"] == [], seen
        assert await eventually(
            lambda: get_json(http, gw_b.url + "/admin/replicas/r0"), lambda r: r["draining"]
        )
        assert await _routed(client_b, 4) == {"r1", "r2"}
        # Not drained: nobody is listed.
        status, body = await admin_call(http, "GET", gw_a.url + "/admin/replicas/r1")
        assert body["drain_not_seen_by"] == [], body
