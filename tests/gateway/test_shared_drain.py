"""Draining a replica with several gateway instances on one real redis-server, in front of two
simulated replicas (the twin): a drain on one instance applies to every instance within about
one state refresh, is kept across gateway restarts, and is refused (503) while Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import openai
from shared_cluster import (
    BASE,
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


async def _gauge(http: aiohttp.ClientSession, url: str, replica: str) -> str:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    prefix = f'loragate_replica_draining{{replica="{replica}"}} '
    return next(line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix))


async def test_a_drain_on_one_instance_holds_for_every_instance_and_across_restarts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS, routing="round_robin")
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async with contextlib.AsyncExitStack() as first:
            gw_a, gw_b = [
                await first.enter_async_context(running_gateway(cfg, port=0)) for _ in range(2)
            ]
            client_b = await first.enter_async_context(sdk(gw_b.url))

            # A stream through B, on r0, held open.
            stream = None
            for _ in range(2):  # round_robin: r0 within two requests
                raw = await client_b.completions.with_raw_response.create(
                    model=BASE, prompt="hold", max_tokens=3000, stream=True,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                if raw.headers["x-loragate-replica"] == "r0":
                    stream = raw.parse()
                    break
                await raw.parse().close()
            assert stream is not None
            await stream.__aiter__().__anext__()  # flowing

            # Drained on A: A's answer counts B's stream (A's view of the shared state).
            status, body = await admin_call(http, "POST", gw_a.url + "/admin/replicas/r0/drain")
            assert (status, body["draining"]) == (200, True), body
            assert body["in_flight_here"] == 0

            async def a_r0() -> Any:
                return await get_json(http, gw_a.url + "/admin/replicas/r0")

            seen = await eventually(a_r0, lambda r: r["in_flight"] == 1)
            assert seen["in_flight"] == 1, seen

            # B takes the drain from Redis at its next refresh, and stops routing there.
            async def b_r0() -> Any:
                return await get_json(http, gw_b.url + "/admin/replicas/r0")

            seen = await eventually(b_r0, lambda r: r["draining"])
            assert seen["draining"] is True, seen
            assert seen["in_flight_here"] == 1  # its stream runs on
            assert await _gauge(http, gw_b.url, "r0") == "1.0"
            assert [await routed_to(client_b) for _ in range(6)] == ["r1"] * 6

            # The stream ends (its client leaves); A sees in-flight 0: safe to restart r0.
            await stream.close()
            seen = await eventually(a_r0, lambda r: r["in_flight"] == 0)
            assert seen["in_flight"] == 0, seen

        # Every instance stopped; a new one starts drained, before any refresh round.
        gw_c = await stack.enter_async_context(running_gateway(cfg, port=0))
        client_c = await stack.enter_async_context(sdk(gw_c.url))
        assert gw_c.gateway.pool.is_draining("r0")
        assert [await routed_to(client_c) for _ in range(4)] == ["r1"] * 4
        status, body = await admin_call(http, "GET", gw_c.url + "/admin/replicas")
        assert {r["id"]: r["draining"] for r in body["replicas"]} == {"r0": True, "r1": False}

        # Undrained (on C): routed to again.
        status, body = await admin_call(http, "DELETE", gw_c.url + "/admin/replicas/r0/drain")
        assert (status, body["draining"]) == (200, False), body
        assert sorted([await routed_to(client_c) for _ in range(2)]) == ["r0", "r1"]
        assert await _gauge(http, gw_c.url, "r0") == "0.0"


async def test_every_instance_answers_503_saying_so_when_every_replica_drains(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gw_a, gw_b = [
            await stack.enter_async_context(running_gateway(cfg, port=0)) for _ in range(2)
        ]
        client_b = await stack.enter_async_context(sdk(gw_b.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        for rid in ("r0", "r1"):
            status, _ = await admin_call(http, "POST", f"{gw_a.url}/admin/replicas/{rid}/drain")
            assert status == 200

        async def b_view() -> Any:
            return await get_json(http, gw_b.url + "/admin/replicas")

        seen = await eventually(b_view, lambda v: all(r["draining"] for r in v["replicas"]))
        assert all(r["draining"] for r in seen["replicas"]), seen
        try:
            await client_b.completions.create(model="lora-0", prompt="x", max_tokens=2)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503
            err = exc.response.json()["error"]
            assert err["code"] == "no_replica_available"
            assert "every replica is draining (r0, r1)" in err["message"], err
        else:
            raise AssertionError("served while every replica drains")


async def test_drain_writes_while_redis_is_down_are_503(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        status, _ = await admin_call(http, "POST", gw.url + "/admin/replicas/r1/drain")
        assert status == 200

        async def health() -> str:
            return str((await get_json(http, gw.url + "/health"))["status"])

        await asyncio.to_thread(redis_server.stop)
        assert await eventually(health, lambda s: s == "degraded") == "degraded"
        for method, rid in (("POST", "r0"), ("DELETE", "r1")):
            status, body = await admin_call(http, method, f"{gw.url}/admin/replicas/{rid}/drain")
            assert status == 503, body
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == "state_unavailable"
            assert "Redis" in body["error"]["message"]
        # Nothing changed: r1 still drained, r0 not, and the 404 still comes first.
        assert (gw.gateway.pool.is_draining("r0"), gw.gateway.pool.is_draining("r1")) == (
            False,
            True,
        )
        status, body = await admin_call(http, "POST", gw.url + "/admin/replicas/r9/drain")
        assert status == 404, body
