"""``PUT /admin/adapters/N`` (``gateway.admin_adapter_update``) over real loopback with twin
replicas: a registered adapter's path is replaced in place (vLLM's ``load_inplace`` on the
replicas that hold it) while requests keep coming, none of them answered 404, and a stream
running during the swap finishes; the errors are POST's and DELETE's (400 naming the key, 404
unknown, 409 config-file adapter); a path every replica refuses leaves the old definition in force;
with Redis the new definition reaches the other instance. Before: 405 (Allow: DELETE)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import web
from gateway_harness import ScriptedReplica, gateway_config, openai_client, serving
from shared_cluster import AUTH, eventually, sdk, shared_config, twin_replicas

from loragate.core.config import GatewayConfig, StateConfig
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer


def _embedded(cfg: GatewayConfig) -> GatewayConfig:
    return dataclasses.replace(cfg, state=StateConfig())


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _roots(http: aiohttp.ClientSession, url: str, name: str) -> set[str]:
    """The paths ``name``'s cards give in a ``/v1/models`` (a replica's or the gateway's)."""
    async with http.get(url + "/v1/models") as resp:
        cards = (await resp.json())["data"]
    return {c["root"] for c in cards if c["id"] == name}


async def test_put_reloads_a_registered_adapter_in_place_with_no_404_meanwhile(
    tmp_path: Path,
) -> None:
    old, new = str(tmp_path / "cust-v1"), str(tmp_path / "cust-v2")
    write_adapter_folder(old, rank=8)
    write_adapter_folder(new, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = _embedded(shared_config(replicas, tmp_path, "redis://unused", 1))
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = await stack.enter_async_context(sdk(gw.url))
        status, body = await _call(
            http, "POST", gw.url + "/admin/adapters", {"name": "cust-1", "path": old}
        )
        assert status == 201, body
        holder = body["loaded_on"][0]
        holder_url = replicas[int(holder[1:])].url
        assert await _roots(http, holder_url, "cust-1") == {old}

        stream = await client.completions.create(
            model="cust-1", prompt="x", max_tokens=40, stream=True
        )
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices
        answers: list[str] = []
        done = asyncio.Event()

        async def keep_asking() -> None:  # requests for cust-1 throughout the swap
            while not done.is_set() or len(answers) < 3:
                try:
                    await client.completions.create(model="cust-1", prompt="x", max_tokens=2)
                    answers.append("ok")
                except openai.APIStatusError as exc:
                    answers.append(f"{exc.status_code}")
                if len(answers) > 500:
                    return

        asker = asyncio.create_task(keep_asking())
        await asyncio.sleep(0)
        status, body = await _call(http, "PUT", gw.url + "/admin/adapters/cust-1", {"path": new})
        done.set()
        await asyncio.wait_for(asker, timeout=30)
        assert status == 200, body
        assert (body["name"], body["path"], body["rank"]) == ("cust-1", new, 8)
        assert body["previous"]["path"] == old
        # (requests routed to the other replica meanwhile may have loaded it there too)
        assert holder in body["reloaded_on"]
        assert (body["refused_by"], body["not_tried"]) == ({}, {})
        assert body["persisted"] == "memory"
        assert set(answers) == {"ok"}, answers  # never unknown, never failed
        rest = [chunk async for chunk in it]  # the stream that ran during the swap finishes
        assert rest and rest[-1].choices[0].finish_reason is not None

        for rep in replicas:  # every replica that lists it, from the new path (own cards)
            assert await _roots(http, rep.url, "cust-1") in ({new}, set())
        assert await _roots(http, holder_url, "cust-1") == {new}
        assert await _roots(http, gw.url, "cust-1") == {new}
        status, listed = await _call(http, "GET", gw.url + "/admin/adapters")
        item = next(a for a in listed["adapters"] if a["name"] == "cust-1")
        assert (item["path"], item["source"]) == (new, "admin")
        assert holder in item["registered_on"] and item["stale_on"] == {}

        # The same path again: reloaded in place too (the folder may have been rewritten).
        status, body = await _call(http, "PUT", gw.url + "/admin/adapters/cust-1", {"path": new})
        assert status == 200 and holder in body["reloaded_on"], body


async def test_put_answers_post_and_delete_errors_and_keeps_the_old_path_on_refusal(
    tmp_path: Path,
) -> None:
    old = str(tmp_path / "cust-v1")
    write_adapter_folder(old, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = _embedded(shared_config(replicas, tmp_path, "redis://unused", 1))
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = await stack.enter_async_context(sdk(gw.url))
        url = gw.url + "/admin/adapters/"
        status, body = await _call(http, "PUT", url + "nobody", {"path": old})
        assert status == 404 and body["error"]["param"] == "name", body
        status, body = await _call(http, "PUT", url + "lora-0", {"path": old})
        assert status == 409 and "config file" in body["error"]["message"], body
        status, body = await _call(
            http, "POST", gw.url + "/admin/adapters", {"name": "cust-1", "path": old}
        )
        assert status == 201, body
        for bad, param in (
            ({"name": "cust-2", "path": old}, "name"),
            ({"path": old, "colour": "red"}, "colour"),
            ({"path": ""}, "path"),
            ({"path": old, "rank": 64}, "rank"),  # the folder says 8
            ({"path": old, "tenants": ["nobody"]}, "tenants[0]"),
        ):
            status, body = await _call(http, "PUT", url + "cust-1", bad)
            assert status == 400 and body["error"]["param"] == param, (bad, body)
        status, body = await _call(http, "PUT", url + "cust-1", [old])
        assert status == 400, body

        missing = str(tmp_path / "no-such-folder")
        status, body = await _call(http, "PUT", url + "cust-1", {"path": missing})
        assert status == 400 and body["error"]["param"] == "path", body
        message = body["error"]["message"]
        assert "no replica could reload adapter 'cust-1'" in message, message
        assert f"stays as it was (path {old!r})" in message
        status, listed = await _call(http, "GET", gw.url + "/admin/adapters")
        item = next(a for a in listed["adapters"] if a["name"] == "cust-1")
        assert item["path"] == old and item["registered_on"], item
        done = await client.completions.create(model="cust-1", prompt="x", max_tokens=2)
        assert done.choices  # still served, from the old path


async def test_put_through_one_instance_reaches_the_other_through_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    old, new = str(tmp_path / "cust-v1"), str(tmp_path / "cust-v2")
    write_adapter_folder(old, rank=8)
    write_adapter_folder(new, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        status, body = await _call(
            http, "POST", gw_a.url + "/admin/adapters", {"name": "cust-1", "path": old}
        )
        assert status == 201, body

        async def b_path() -> str | None:
            return getattr(gw_b.gateway.catalog.adapters.get("cust-1"), "path", None)

        assert await eventually(b_path, lambda p: p == old) == old
        status, body = await _call(
            http, "PUT", gw_b.url + "/admin/adapters/cust-1", {"path": new, "rank": 8}
        )
        assert status == 200 and body["persisted"] == "redis", body

        async def a_path() -> str | None:
            return getattr(gw_a.gateway.catalog.adapters.get("cust-1"), "path", None)

        assert await eventually(a_path, lambda p: p == new) == new
        client = await stack.enter_async_context(sdk(gw_a.url))
        done = await client.completions.create(model="cust-1", prompt="x", max_tokens=2)
        assert done.choices
        status, body = await _call(http, "PUT", gw_a.url + "/admin/adapters/nobody", {"path": new})
        assert status == 404, body


class HeldReplica(ScriptedReplica):
    """Holds each in-place load until ``release`` is set; ``inplace_seen`` is set when one
    arrives. Records the path each completion was served from."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()
        self.inplace_seen = asyncio.Event()
        self.served_from: list[str] = []

    async def _load(self, request: web.Request) -> web.Response:
        if (await request.json()).get("load_inplace"):
            self.inplace_seen.set()
            await self.release.wait()
        return await super()._load(request)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        model = (await request.json()).get("model")
        self.served_from.append(self.adapters.get(model, "base"))
        return await super()._answer(request)


async def test_requests_during_the_in_place_reload_are_served_by_the_old_weights() -> None:
    # Before (the catalog took the new definition at once): the request waited for the reload
    # and, had the reload been refused, got its refusal as a 502.
    rep = HeldReplica("r0")
    async with contextlib.AsyncExitStack() as stack:
        rep.url, _ = await stack.enter_async_context(serving(rep.app))
        cfg = gateway_config([rep.url], admin={"token": AUTH["Authorization"].split()[1]})
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = await stack.enter_async_context(openai_client(gw.url))
        status, body = await _call(
            http, "POST", gw.url + "/admin/adapters", {"name": "cust-1", "path": "/loras/v1"}
        )
        assert status == 201, body
        put = asyncio.create_task(
            _call(http, "PUT", gw.url + "/admin/adapters/cust-1", {"path": "/loras/v2"})
        )
        await asyncio.wait_for(rep.inplace_seen.wait(), timeout=10)  # the reload is under way
        # The definition in force stays until a replica took the new one.
        assert await _roots(http, gw.url, "cust-1") == {"/loras/v1"}
        done = await asyncio.wait_for(
            client.completions.create(model="cust-1", prompt="x", max_tokens=2), timeout=10
        )
        assert done.choices and rep.served_from == ["/loras/v1"]  # at once, the old weights
        assert not put.done()
        rep.release.set()
        status, body = await asyncio.wait_for(put, timeout=10)
        assert status == 200 and body["reloaded_on"] == ["r0"], body
        assert await _roots(http, gw.url, "cust-1") == {"/loras/v2"}
        done = await client.completions.create(model="cust-1", prompt="x", max_tokens=2)
        assert done.choices
        assert rep.served_from == ["/loras/v1", "/loras/v2"]  # then from the new path
