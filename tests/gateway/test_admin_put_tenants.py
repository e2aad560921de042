"""``PUT /admin/adapters/N`` and the adapter's tenants (``gateway.admin_adapter_update``), over
real loopback with twin replicas, two gateway instances on one redis-server and the ``openai``
SDK with two tenants' keys: a ``PUT`` that leaves ``tenants`` out keeps the definition in
force's tenants, on both instances (before: it opened the adapter to every tenant, ``"tenants":
null`` in the 200); ``"tenants": null`` opens it to every tenant, as in a ``POST``; a list
replaces them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
from shared_cluster import AUTH, eventually, shared_config, twin_replicas

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer

TENANTS = [
    {"name": "acme", "api_keys": ["sk-acme"]},
    {"name": "globex", "api_keys": ["sk-globex"]},
]


@contextlib.asynccontextmanager
async def _client(url: str, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, timeout=30.0
    ) as client:
        yield client


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _answer(client: openai.AsyncOpenAI) -> int:
    """200, or the status the gateway answered a completion for ``t2`` with."""
    try:
        await client.completions.create(model="t2", prompt="x", max_tokens=2)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


async def test_put_without_tenants_keeps_them_on_every_instance_and_null_opens_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    v1, v2, v3 = (str(tmp_path / f"t2-v{i}") for i in (1, 2, 3))
    for path in (v1, v2, v3):
        write_adapter_folder(path, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1, tenants=TENANTS)
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        acme = {
            gw.url: await stack.enter_async_context(_client(gw.url, "sk-acme"))
            for gw in (gw_a, gw_b)
        }
        globex = {
            gw.url: await stack.enter_async_context(_client(gw.url, "sk-globex"))
            for gw in (gw_a, gw_b)
        }

        status, body = await _call(
            http,
            "POST",
            gw_a.url + "/admin/adapters",
            {"name": "t2", "path": v1, "tenants": ["acme"]},
        )
        assert status == 201 and body["tenants"] == ["acme"], body

        async def path_on(gw: Any) -> str | None:
            return getattr(gw.gateway.catalog.adapters.get("t2"), "path", None)

        assert await eventually(lambda: path_on(gw_b), lambda p: p == v1) == v1
        for url in (gw_a.url, gw_b.url):
            assert (await _answer(acme[url]), await _answer(globex[url])) == (200, 404)

        # Re-pointed at a retrained folder through the other instance, tenants left out.
        status, body = await _call(http, "PUT", gw_b.url + "/admin/adapters/t2", {"path": v2})
        assert status == 200, body
        assert (body["path"], body["tenants"], body["tenants_source"]) == (v2, ["acme"], "kept")
        assert body["previous"]["tenants"] == ["acme"]
        assert await eventually(lambda: path_on(gw_a), lambda p: p == v2) == v2
        for url in (gw_a.url, gw_b.url):  # still acme's only, on both instances
            assert (await _answer(acme[url]), await _answer(globex[url])) == (200, 404)
        status, listed = await _call(http, "GET", gw_a.url + "/admin/adapters")
        item = next(a for a in listed["adapters"] if a["name"] == "t2")
        assert (item["path"], item["tenants"]) == (v2, ["acme"])

        # An explicit null opens it to every tenant, as in a POST.
        status, body = await _call(
            http, "PUT", gw_a.url + "/admin/adapters/t2", {"path": v3, "tenants": None}
        )
        assert status == 200, body
        assert (body["tenants"], body["tenants_source"]) == (None, "request")
        assert await eventually(lambda: path_on(gw_b), lambda p: p == v3) == v3
        for url in (gw_a.url, gw_b.url):
            assert (await _answer(acme[url]), await _answer(globex[url])) == (200, 200)

        # A list replaces them.
        status, body = await _call(
            http, "PUT", gw_b.url + "/admin/adapters/t2", {"path": v3, "tenants": ["globex"]}
        )
        assert status == 200 and body["tenants"] == ["globex"], body

        async def tenants_on_a() -> object:
            spec = gw_a.gateway.catalog.adapters.get("t2")
            return None if spec is None else spec.tenants

        assert await eventually(tenants_on_a, lambda t: t == frozenset({"globex"}))
        for url in (gw_a.url, gw_b.url):
            assert (await _answer(acme[url]), await _answer(globex[url])) == (404, 200)
