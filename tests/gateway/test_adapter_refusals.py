"""Refused adapter loads are remembered: a replica that refused to load an adapter gets no
requests for it for ``poller.adapter_refusal_ttl_s`` (none gets any while all refused), over
loopback with scripted replicas that refuse chosen adapters as vLLM does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import BASE, PickyReplica, gateway_config, openai_client, picky_replicas
from metric_counts import metrics_text

from loragate.core.clock import VirtualClock
from loragate.core.errors import ConfigError
from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TTL_S = 60.0


@pytest.fixture
async def picky() -> AsyncIterator[list[PickyReplica]]:
    async with picky_replicas() as replicas:
        yield replicas


async def _texts(client: openai.AsyncOpenAI, model: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        done = await client.completions.create(model=model, prompt="p", max_tokens=1)
        out.append(done.choices[0].text)
    return out


async def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url + path, headers=AUTH, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_a_refusing_replica_gets_no_more_requests_for_that_adapter(
    picky: list[PickyReplica],
) -> None:
    r0 = picky[0]
    r0.refuse = {"lora-0"}
    clock = VirtualClock(1000.0)
    cfg = gateway_config([r.url for r in picky], routing="round_robin", admin={"token": TOKEN})
    async with running_gateway(cfg, port=0, clock=clock) as gw, openai_client(gw.url) as client:
        assert await _texts(client, "lora-0", 6) == ["hi from r1"] * 6
        assert r0.refused == 1  # the first request's refusal, not every other request's
        # r0 still serves the base model and its other adapters.
        assert set(await _texts(client, BASE, 2)) == {"hi from r0", "hi from r1"}
        assert set(await _texts(client, "lora-1", 2)) == {"hi from r0", "hi from r1"}
        metrics = await metrics_text(gw.url)
        assert 'loragate_adapter_load_refusals_total{adapter="lora-0",replica="r0"} 1.0' in metrics
        _, body = await _admin(gw.url, "GET", "/admin/replicas")
        listed = {r["id"]: r for r in body["replicas"]}
        refused = listed["r0"]["refused_adapters"]
        assert set(refused) == {"lora-0"} and refused["lora-0"]["expires_in_s"] == TTL_S
        assert "max_lora_rank" in refused["lora-0"]["error"]
        assert listed["r1"]["refused_adapters"] == {}

        clock.advance_by(TTL_S)  # forgotten: r0 is tried again (and refuses again)
        assert await _texts(client, "lora-0", 4) == ["hi from r1"] * 4
        assert r0.refused == 2
        r0.refuse.clear()  # fixed, but the refusal is still remembered: no load is tried
        assert await _texts(client, "lora-0", 4) == ["hi from r1"] * 4
        assert r0.refused == 2 and "lora-0" not in r0.adapters
        r0.adapters["lora-0"] = "/loras/lora-0"  # loaded there by someone: /v1/models lists it
        await gw.gateway.pool.poll_once()
        assert "hi from r0" in await _texts(client, "lora-0", 4)


async def test_without_memory_every_request_is_refused_first(
    picky: list[PickyReplica],
) -> None:
    # adapter_refusal_ttl_s: 0 is the behaviour before refusals were remembered.
    picky[0].refuse = {"lora-0"}
    cfg = gateway_config(
        [r.url for r in picky],
        routing="round_robin",
        poller={"interval_s": 3600, "adapter_refusal_ttl_s": 0},
    )
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        assert await _texts(client, "lora-0", 6) == ["hi from r1"] * 6
        # round_robin's counter moves on with the retry too, so r0 comes first every time.
        assert picky[0].refused == 6
        metrics = await metrics_text(gw.url)
        assert 'loragate_adapter_load_refusals_total{adapter="lora-0",replica="r0"} 6.0' in metrics


async def test_when_every_replica_refused_it_a_listing_ends_the_refusal(
    picky: list[PickyReplica],
) -> None:
    # Every replica refused: answered from the refusals (tests/gateway/test_refused_everywhere.py)
    # until one lapses or a replica's /v1/models lists the adapter.
    for rep in picky:
        rep.refuse = {"lora-0"}
    cfg = gateway_config([r.url for r in picky], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        for _ in (1, 2):
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
            assert info.value.status_code == 502
            assert [r.refused for r in picky] == [1, 1]  # both tried once, then remembered
        picky[1].refuse.clear()
        picky[1].adapters["lora-0"] = "/loras/lora-0"  # loaded there by someone: listed
        await gw.gateway.pool.poll_once()
        assert await _texts(client, "lora-0", 2) == ["hi from r1"] * 2
        assert gw.gateway.pool.refusing(gw.gateway.proxy.catalog.adapters["lora-0"]) == {"r0"}


async def test_registering_the_adapter_again_forgets_its_refusals(
    picky: list[PickyReplica],
) -> None:
    r0, _ = picky
    r0.refuse = {"extra"}
    cfg = gateway_config([r.url for r in picky], routing="round_robin", admin={"token": TOKEN})
    spec = {"name": "extra", "path": "/loras/extra"}
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        assert (await _admin(gw.url, "POST", "/admin/adapters", spec))[0] == 201
        assert await _texts(client, "extra", 3) == ["hi from r1"] * 3
        assert r0.refused == 1
        r0.refuse.clear()  # the operator fixed r0, then registers the adapter again
        assert (await _admin(gw.url, "DELETE", "/admin/adapters/extra"))[0] == 200
        assert (await _admin(gw.url, "POST", "/admin/adapters", spec))[0] == 201
        _, body = await _admin(gw.url, "GET", "/admin/replicas")
        assert all(r["refused_adapters"] == {} for r in body["replicas"])
        assert "hi from r0" in await _texts(client, "extra", 2)


@pytest.mark.parametrize("value", [-1, "60", True])
def test_a_bad_refusal_ttl_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"poller\.adapter_refusal_ttl_s"):
        gateway_config(["http://127.0.0.1:1"], poller={"adapter_refusal_ttl_s": value})
