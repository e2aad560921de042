"""Two gateway instances on one real redis-server route as one for refused adapter loads: a
refusal met through one keeps the other off that replica for that adapter, forgetting it
through one forgets it for both, and a refusal met while Redis is down reaches the other
instance once Redis is back. Scripted replicas on loopback refuse chosen adapters as vLLM does.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import aiohttp
import openai
from gateway_harness import PickyReplica, gateway_config, openai_client, picky_replicas
from shared_cluster import eventually

from loragate.core.config import GatewayConfig
from loragate.gateway import running_gateway
from redis_fixture import RedisServer

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TTL_S = 60.0
# Bound of the waits for another instance to see a write (a hang guard: on a loaded machine a
# Redis call can time out, op_timeout_s 0.5, and the resync after it waits out a backoff).
WAIT_S = 30.0


def _config(replicas: list[PickyReplica], redis_url: str) -> GatewayConfig:
    # round_robin starts at r0 in every instance: without the shared refusal, the second
    # instance's first request for the adapter would go to r0 and be refused again.
    return gateway_config(
        [r.url for r in replicas],
        routing="round_robin",
        admin={"token": TOKEN},
        state={
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
            "refresh_s": 0.05,
            "op_timeout_s": 0.5,
            "maintenance_interval_s": 0.02,
        },
    )


async def _replica_of(client: openai.AsyncOpenAI, model: str) -> str:
    raw = await client.completions.with_raw_response.create(model=model, prompt="p", max_tokens=1)
    return raw.headers["x-loragate-replica"]


async def _replicas_view(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/admin/replicas", headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.json()
    return {r["id"]: r for r in body["replicas"]}


def _refused(view: dict[str, Any]) -> dict[str, list[str]]:
    return {rid: sorted(r["refused_adapters"]) for rid, r in view.items()}


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        return await resp.text()


async def test_a_refusal_met_through_one_instance_keeps_the_other_off_that_replica(
    redis_server: RedisServer,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        r0, r1 = await stack.enter_async_context(picky_replicas())
        r0.refuse = {"lora-0"}
        cfg = _config([r0, r1], redis_server.url)
        gw1 = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw2 = await stack.enter_async_context(running_gateway(cfg, port=0))
        c1 = await stack.enter_async_context(openai_client(gw1.url))
        c2 = await stack.enter_async_context(openai_client(gw2.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        # Through gateway 1: r0 refuses, the request is retried on r1.
        assert await _replica_of(c1, "lora-0") == "r1"
        assert r0.refused == 1

        # Gateway 2 never met the refusal; it learns it through Redis, and that the refused
        # load took lora-0 out of r0's shared shadow residency again. Gateway 1 writes the two
        # one after the other (the refusal, then the unload): a refresh of gateway 2 between
        # them sees the refusal with lora-0 still registered on r0, so wait for both.
        async def view_2() -> dict[str, Any]:
            return await _replicas_view(http, gw2.url)

        view2 = await eventually(
            view_2,
            lambda v: (
                _refused(v)["r0"] == ["lora-0"]
                and "lora-0" not in v["r0"]["residency"]["registered"]
            ),
            timeout_s=WAIT_S,
        )
        assert _refused(view2) == {"r0": ["lora-0"], "r1": []}
        assert "lora-0" not in view2["r0"]["residency"]["registered"]
        refusal = view2["r0"]["refused_adapters"]["lora-0"]
        assert "max_lora_rank" in refusal["error"] and 0 < refusal["expires_in_s"] <= TTL_S

        # Through gateway 2, every request for lora-0 goes to r1: r0 gets no second load call.
        assert [await _replica_of(c2, "lora-0") for _ in range(4)] == ["r1"] * 4
        assert r0.refused == 1 and r0.load_calls == 1
        assert not any(body.get("model") == "lora-0" for body in r0.requests)
        # r0 still gets everything else through gateway 2.
        assert {await _replica_of(c2, "lora-1") for _ in range(2)} == {"r0", "r1"}
        # Each instance counts the refused loads it made itself.
        line = 'loragate_adapter_load_refusals_total{adapter="lora-0",replica="r0"} 1.0'
        assert line in await _metrics(http, gw1.url)
        assert 'refusals_total{adapter="lora-0"' not in await _metrics(http, gw2.url)

        # r0 gets lora-0 (an operator loaded it): gateway 2's poll sees it listed and forgets
        # the refusal, for gateway 1 too, which has not polled since.
        r0.refuse.clear()
        r0.adapters["lora-0"] = "/loras/lora-0"
        await gw2.gateway.pool.poll_once()

        async def refused_1() -> dict[str, list[str]]:
            return _refused(await _replicas_view(http, gw1.url))

        seen = await eventually(refused_1, lambda v: v["r0"] == [], timeout_s=WAIT_S)
        assert seen == {"r0": [], "r1": []}
        assert "r0" in {await _replica_of(c1, "lora-0") for _ in range(2)}


async def test_a_refusal_met_while_redis_is_down_reaches_the_other_instance_after(
    redis_server: RedisServer,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        r0, r1 = await stack.enter_async_context(picky_replicas())
        r0.refuse = {"lora-2"}
        cfg = _config([r0, r1], redis_server.url)
        gw1 = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw2 = await stack.enter_async_context(running_gateway(cfg, port=0))
        c1 = await stack.enter_async_context(openai_client(gw1.url))
        c2 = await stack.enter_async_context(openai_client(gw2.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        redis_server.stop()  # and its data
        # Gateway 1 meets the refusal on its local view and keeps to it.
        assert [await _replica_of(c1, "lora-2") for _ in range(3)] == ["r1"] * 3
        assert r0.refused == 1
        assert gw1.gateway.shared.degraded

        redis_server.start()

        async def refused_2() -> dict[str, list[str]]:
            return _refused(await _replicas_view(http, gw2.url))

        seen = await eventually(refused_2, lambda v: v["r0"] == ["lora-2"], timeout_s=WAIT_S)
        assert seen == {"r0": ["lora-2"], "r1": []}
        assert [await _replica_of(c2, "lora-2") for _ in range(3)] == ["r1"] * 3
        assert r0.refused == 1
