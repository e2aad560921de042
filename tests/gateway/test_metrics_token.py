"""``GET /metrics`` behind an opt-in bearer token (``metrics.token`` or
``LORAGATE_METRICS_TOKEN``): its series name adapters, which one tenant must not learn of
another's. Open by default; ``/health`` stays open."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.gateway import load_config, running_gateway

SCRAPE = "scrape-s3cret"
TENANTS = [
    {"name": "acme", "api_keys": ["sk-acme"]},
    {"name": "zeta", "api_keys": ["sk-zeta"]},
]


async def _get(
    http: aiohttp.ClientSession, url: str, token: str | None = None
) -> tuple[int, bytes, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


def _is_401(status: int, body: bytes) -> bool:
    error = json.loads(body)["error"]
    return (
        status == 401
        and set(error) == {"message", "type", "param", "code"}
        and (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
        and "metrics token" in error["message"]
        and b"lora" not in body
    )


async def test_with_a_token_metrics_need_it_and_health_stays_open(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_METRICS_TOKEN", raising=False)
    cfg = gateway_config(
        [r.url for r in replicas],
        tenants=TENANTS,
        adapters=[{"name": "acme-secret-lora", "path": "/loras/a", "tenants": ["acme"]}],
        metrics={"token": SCRAPE},
    )
    async with (
        running_gateway(cfg, port=0) as gw,
        aiohttp.ClientSession() as http,
        openai_client(gw.url, "sk-acme") as acme,
    ):
        await acme.completions.create(model="acme-secret-lora", prompt="p", max_tokens=2)
        url = gw.url + "/metrics"
        # before: 200 and loragate_requests_total{adapter="acme-secret-lora",...} to anyone
        for token in (None, "sk-zeta", "sk-acme", SCRAPE + "x"):
            status, body, _ = await _get(http, url, token)
            assert _is_401(status, body), (token, status, body[:200])
        async with http.get(url, headers={"Authorization": SCRAPE}) as resp:  # no scheme
            assert resp.status == 401
        status, body, content_type = await _get(http, url, SCRAPE)  # as Prometheus sends it
        assert status == 200 and content_type.startswith("text/plain")
        assert b'loragate_requests_total{adapter="acme-secret-lora"' in body
        status, body, _ = await _get(http, gw.url + "/health")
        assert status == 200 and b'"status": "ok"' in body


async def test_metrics_are_open_by_default(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_METRICS_TOKEN", raising=False)
    cfg = gateway_config([r.url for r in replicas])
    assert cfg.metrics.token is None
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        status, body, _ = await _get(http, gw.url + "/metrics")
        assert status == 200 and b"loragate_requests_total" in body


async def test_the_token_from_the_environment(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAGATE_METRICS_TOKEN", "from-env")
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        status, body, _ = await _get(http, gw.url + "/metrics")
        assert _is_401(status, body)
        status, _, _ = await _get(http, gw.url + "/metrics", "from-env")
        assert status == 200


async def test_a_reload_sets_and_removes_the_token(
    replicas: list[ScriptedReplica], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_METRICS_TOKEN", raising=False)
    path = tmp_path / "gw.yaml"
    head = f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\nadmin: {{token: adm}}\n"
    path.write_text(head, encoding="utf-8")
    admin = {"Authorization": "Bearer adm"}
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        url = gw.url + "/metrics"
        assert (await _get(http, url))[0] == 200
        path.write_text(head + f"metrics: {{token: {SCRAPE}}}\n", encoding="utf-8")
        async with http.post(gw.url + "/admin/reload", headers=admin) as resp:
            assert resp.status == 200
        status, body, _ = await _get(http, url)
        assert _is_401(status, body)
        assert (await _get(http, url, SCRAPE))[0] == 200
        path.write_text(head, encoding="utf-8")
        async with http.post(gw.url + "/admin/reload", headers=admin) as resp:
            assert resp.status == 200
        assert (await _get(http, url))[0] == 200


async def test_an_authorization_header_that_is_not_utf8_is_a_401(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the admin guard's comparison raised on it: a 500 ``internal_error``."""
    monkeypatch.delenv("LORAGATE_METRICS_TOKEN", raising=False)
    cfg = gateway_config(
        [r.url for r in replicas], admin={"token": "adm"}, metrics={"token": SCRAPE}
    )
    async with running_gateway(cfg, port=0) as gw:
        for path in (b"/metrics", b"/admin/replicas"):
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            writer.write(
                b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer \xff\xfe\r\n"
                b"Connection: close\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(), timeout=30)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401 "), answer[:300]
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
