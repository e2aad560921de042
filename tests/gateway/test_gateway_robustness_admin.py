"""Bad input to the admin API: a clear OpenAI-shaped 400, nothing registered, and nothing an
admin can register breaks the proxy for the adapter's requests (real loopback sockets)."""

from __future__ import annotations

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"name": "big", "path": "/loras/big", "rank": 1' + b"0" * 400 + b"}", "rank"),
        (b'{"name": "big", "path": "/loras/big", "rank": 70000}', "rank"),
        (b'{"name": "big", "path": "/loras/big", "rank": 0}', "rank"),
        (b"[" * 30_000 + b"]" * 30_000, None),
    ],
)
async def test_bad_adapter_registrations_are_400(
    replicas: list[ScriptedReplica], body: bytes, param: str | None
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": "admin-secret"})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/admin/adapters", data=body, headers=ADMIN) as resp:
            assert resp.status == 400, await resp.text()
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == param
        async with http.get(gw.url + "/admin/adapters", headers=ADMIN) as resp:
            assert "big" not in {a["name"] for a in (await resp.json())["adapters"]}


async def test_an_empty_registration_says_the_body_is_empty(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": "admin-secret"})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/admin/adapters", headers=ADMIN) as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
        assert err["message"] == "the request body is empty; expected a JSON object"
        assert err["code"] == "invalid_request"


@pytest.mark.parametrize("routing", ["loragate", "least_loaded"])
async def test_largest_allowed_rank_is_routed(
    replicas: list[ScriptedReplica], routing: str
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas], admin={"token": "admin-secret"}, routing=routing
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        spec = {"name": "big", "path": "/loras/big", "rank": 65536}
        async with http.post(gw.url + "/admin/adapters", json=spec, headers=ADMIN) as resp:
            assert resp.status == 201
        for _ in range(3):
            body = {"model": "big", "prompt": "p", "max_tokens": 1 << 20}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
