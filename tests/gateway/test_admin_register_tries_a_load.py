"""``POST /admin/adapters`` loads the adapter on the first healthy replica that takes it: a path
no replica can load is a 400 with vLLM's reasons (the registration taken back), not a 201
followed by a 502 for every request. Scripted replicas on loopback answer as vLLM does."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
from gateway_harness import PickyReplica, gateway_config, openai_client, picky_replicas

from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url + path, headers=AUTH, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def _cfg(replicas: list[PickyReplica]) -> Any:
    return gateway_config([r.url for r in replicas], admin={"token": TOKEN})


async def test_a_path_no_replica_can_load_is_a_400_and_not_registered() -> None:
    async with picky_replicas() as replicas, running_gateway(_cfg(replicas), port=0) as gw:
        bad = {"name": "typo", "path": "/models/loras/typo"}  # the stubs read /loras/ only
        status, body = await _admin(gw.url, "POST", "/admin/adapters", bad)
        assert status == 400, body
        error = body["error"]
        assert error["param"] == "path" and error["type"] == "invalid_request_error"
        assert "no replica could load adapter 'typo' from '/models/loras/typo'" in error["message"]
        assert "replica r0: " in error["message"] and "replica r1: " in error["message"]
        assert "No adapter found" in error["message"]  # vLLM's reason
        _, listed = await _admin(gw.url, "GET", "/admin/adapters")
        assert "typo" not in {a["name"] for a in listed["adapters"]}
        _, reps = await _admin(gw.url, "GET", "/admin/replicas")
        assert all(r["refused_adapters"] == {} for r in reps["replicas"])
        async with openai_client(gw.url) as client:
            try:
                await client.completions.create(model="typo", prompt="x", max_tokens=2)
                raise AssertionError("a request for the rejected adapter was served")
            except openai.NotFoundError:
                pass
        # The corrected path registers (the rejected attempt leaves nothing in the way).
        good = {"name": "typo", "path": "/loras/typo"}
        status, body = await _admin(gw.url, "POST", "/admin/adapters", good)
        assert status == 201, body
        assert any("typo" in r.adapters for r in replicas)


async def test_a_replica_that_refuses_while_another_loads_it_keeps_its_refusal() -> None:
    async with picky_replicas() as replicas, running_gateway(_cfg(replicas), port=0) as gw:
        r0, r1 = replicas
        r0.refuse = {"extra"}
        spec = {"name": "extra", "path": "/loras/extra"}
        status, body = await _admin(gw.url, "POST", "/admin/adapters", spec)
        assert status == 201, body
        assert r0.refused == 1 and r1.adapters.get("extra") == "/loras/extra"
        _, reps = await _admin(gw.url, "GET", "/admin/replicas")
        refused = {r["id"]: set(r["refused_adapters"]) for r in reps["replicas"]}
        assert refused == {"r0": {"extra"}, "r1": set()}
