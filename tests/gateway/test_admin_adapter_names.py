"""Adapter names through the admin API: whatever vLLM 0.32 takes as ``lora_name`` and the
admin API can address afterwards (``org/name`` included) is registered, served and deleted;
a name ``DELETE /admin/adapters/<name>`` could not reach is a 400 naming ``name``."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import yarl
from gateway_harness import ScriptedReplica, gateway_config, openai_client

from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _call(
    http: aiohttp.ClientSession, method: str, url: str | yarl.URL, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, headers=AUTH, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("org/lora", "org/lora"),  # as written: the route takes the slash
        ("team/a b?", "team%2Fa%20b%3F"),  # percent-encoded
    ],
)
async def test_a_name_with_a_slash_is_registered_served_and_deleted(
    replicas: list[ScriptedReplica], name: str, path: str
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with (
        running_gateway(cfg, port=0) as gw,
        aiohttp.ClientSession() as http,
        openai_client(gw.url) as client,
    ):
        adapters = gw.url + "/admin/adapters"
        status, body = await _call(http, "POST", adapters, {"name": name, "path": "/loras/x"})
        assert status == 201 and body["name"] == name
        holders = [r for r in replicas if name in r.adapters]
        assert len(holders) == 1  # loaded where the registration tried it
        done = await client.completions.create(model=name, prompt="p", max_tokens=2)
        assert done.model == name

        url = yarl.URL(adapters + "/" + path, encoded=True)
        status, body = await _call(http, "DELETE", url)
        assert status == 200, body  # before: 404 'no such endpoint' (the route took no '/')
        assert body["deleted"] == name and body["unloaded_from"] == [holders[0].name]
        assert all(name not in r.adapters for r in replicas)
        status, body = await _call(http, "GET", adapters)
        assert name not in {a["name"] for a in body["adapters"]}
        status, body = await _call(http, "DELETE", url)
        assert status == 404 and body["error"]["param"] == "name"


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("..", "'.' and '..'"),
        ("org/../lora", "'.' and '..'"),
        ("./lora", "'.' and '..'"),
        ("lora\nWARNING forged line", "character '\\n' at position 4"),
        ("lora\x00", "character '\\x00' at position 4"),
    ],
)
async def test_a_name_delete_could_not_reach_is_refused(
    replicas: list[ScriptedReplica], name: str, says: str
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        adapters = gw.url + "/admin/adapters"
        status, body = await _call(http, "POST", adapters, {"name": name, "path": "/loras/x"})
        assert status == 400, body
        error = body["error"]
        assert error["param"] == "name" and says in error["message"]
        status, body = await _call(http, "GET", adapters)
        assert name not in {a["name"] for a in body["adapters"]}
    assert all(r.load_calls == 0 for r in replicas)
