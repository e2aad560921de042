"""The admin API (``/admin/*``) over loopback, in front of scripted replicas (embedded store)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


def _is_openai_error(body: Any, code: str) -> bool:
    err = body["error"]
    return set(err) == {"message", "type", "param", "code"} and err["code"] == code


async def test_admin_routes_are_absent_without_a_token(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for method, path in (("GET", "/admin/replicas"), ("POST", "/admin/reload")):
            status, body = await _call(http, method, gw.url + path, headers=AUTH)
            assert status == 404 and _is_openai_error(body, "not_found")
            assert "admin API is disabled" in body["error"]["message"]


async def test_token_from_the_environment_and_401_otherwise(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAGATE_ADMIN_TOKEN", "from-env")
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        url = gw.url + "/admin/adapters"
        for headers in (None, AUTH, {"Authorization": "Bearer from-env-not"}):
            status, body = await _call(http, "GET", url, headers=headers)
            assert status == 401 and _is_openai_error(body, "invalid_api_key")
        status, body = await _call(http, "GET", url, headers={"Authorization": "Bearer from-env"})
        assert status == 200 and len(body["adapters"]) == 4


async def test_replicas_show_snapshots_and_shadow_residency(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        routing="lru_multiplex",
        admin={"token": TOKEN},
        replicas=[
            {"id": f"r{i}", "url": r.url, "settings": {"max_loras": 1, "max_cpu_loras": 2}}
            for i, r in enumerate(replicas)
        ],
    )
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        routed: dict[str, list[str]] = {}
        for model in ("lora-0", "lora-1", "lora-2", "lora-0"):
            raw = await client.completions.with_raw_response.create(
                model=model, prompt="x", max_tokens=2
            )
            routed.setdefault(raw.headers["x-loragate-replica"], []).append(model)
        status, body = await _call(http, "GET", gw.url + "/admin/replicas", headers=AUTH)
    assert status == 200 and body["policy"] == "lru_multiplex"
    assert body["state"] == {"backend": "memory", "degraded": False, "synced": True}
    by_id = {r["id"]: r for r in body["replicas"]}
    assert set(by_id) == {"r0", "r1"}
    for rid, models in routed.items():
        rep = by_id[rid]
        assert rep["healthy"] and rep["in_flight"] == 0
        # how old the replica's view is, not a monotonic-clock reading (which is what it was)
        assert 0.0 <= rep["seconds_since_scrape"] < 60.0 and "scraped_at_s" not in rep
        assert rep["settings"]["max_loras"] == 1 and rep["settings"]["max_cpu_loras"] == 2
        res = rep["residency"]
        # The GPU slot holds the last adapter routed there; the CPU cache the last two.
        assert res["gpu"] == [models[-1]]
        assert res["cpu"][-1] == models[-1] and len(res["cpu"]) <= 2
        assert set(models) <= set(res["registered"])
        assert set(res["registered"]) == set(replicas[int(rid[1:])].adapters)


async def test_register_use_and_delete_an_adapter(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        admin={"token": TOKEN},
        tenants=[{"name": "acme", "api_keys": ["sk-acme"]}, {"name": "zeta", "api_keys": ["sk-z"]}],
    )
    async with (
        running_gateway(cfg, port=0) as gw,
        aiohttp.ClientSession() as http,
        openai_client(gw.url, "sk-acme") as acme,
        openai_client(gw.url, "sk-z") as zeta,
    ):
        url = gw.url + "/admin/adapters"
        new = {"name": "fresh", "path": "/loras/fresh", "rank": 16, "tenants": ["acme"]}
        status, body = await _call(http, "POST", url, headers=AUTH, body=new)
        loaded = {"loaded_on": ["r0"], "untried": False, "refused_by": {}, "not_tried": {}}
        assert status == 201 and body.pop("warning").startswith("registered in the embedded")
        persisted = {"persisted": "memory"}  # lost when this gateway restarts: said so
        assert body == {**new, "rank_source": "request", **loaded, **persisted}
        # Served at once, to the tenants it names only.
        done = await acme.completions.create(model="fresh", prompt="x", max_tokens=2)
        assert done.model == "fresh"
        with pytest.raises(openai.NotFoundError):
            await zeta.completions.create(model="fresh", prompt="x", max_tokens=2)
        holders = [r for r in replicas if "fresh" in r.adapters]
        assert len(holders) == 1
        status, body = await _call(http, "GET", url, headers=AUTH)
        listed = {a["name"]: a for a in body["adapters"]}
        assert listed["fresh"]["source"] == "admin" and listed["lora-0"]["source"] == "config"
        assert listed["fresh"]["registered_on"] == [f"r{replicas.index(holders[0])}"]
        # Duplicates (admin or config names) are conflicts.
        for name in ("fresh", "lora-1"):
            status, body = await _call(http, "POST", url, headers=AUTH, body={**new, "name": name})
            assert status == 409 and _is_openai_error(body, "conflict")
            assert body["error"]["param"] == "name"
        # Delete: gone from the catalog and unloaded from the replica that had it.
        status, body = await _call(http, "DELETE", url + "/fresh", headers=AUTH)
        assert status == 200 and body["unloaded_from"] == [f"r{replicas.index(holders[0])}"]
        assert "fresh" not in holders[0].adapters
        with pytest.raises(openai.NotFoundError):
            await acme.completions.create(model="fresh", prompt="x", max_tokens=2)
        status, body = await _call(http, "DELETE", url + "/fresh", headers=AUTH)
        assert status == 404 and _is_openai_error(body, "model_not_found")
        status, body = await _call(http, "DELETE", url + "/lora-0", headers=AUTH)
        assert status == 409 and "config file" in body["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"path": "/loras/x"}, "name"),
        ({"name": "", "path": "/loras/x"}, "name"),
        ({"name": BASE, "path": "/loras/x"}, "name"),
        ({"name": "x"}, "path"),
        ({"name": "x", "path": "/loras/x", "rank": "8"}, "rank"),
        ({"name": "x", "path": "/loras/x", "rank": 0}, "rank"),
        ({"name": "x", "path": "/loras/x", "tenants": "acme"}, "tenants"),
        ({"name": "x", "path": "/loras/x", "tenants": ["acme", "nobody"]}, "tenants[1]"),
        ({"name": "x", "path": "/loras/x", "owner": "me"}, "owner"),
        (["x"], None),
    ],
)
async def test_bad_adapter_registrations_name_the_key(
    replicas: list[ScriptedReplica], payload: Any, param: str | None
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        admin={"token": TOKEN},
        tenants=[{"name": "acme", "api_keys": ["sk-acme"]}],
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        status, body = await _call(
            http, "POST", gw.url + "/admin/adapters", headers=AUTH, body=payload
        )
        assert status == 400 and _is_openai_error(body, "invalid_request")
        assert body["error"]["param"] == param
        _, listed = await _call(http, "GET", gw.url + "/admin/adapters", headers=AUTH)
        assert len(listed["adapters"]) == 4  # nothing was registered
