"""``GET /livez`` and ``GET /readyz``, the probes Kubernetes needs: liveness must not depend on
the replicas (a gateway restarted while vLLM starts gains nothing), readiness is 503 from the start
of a shutdown only (replica health would take every gateway out of its Service at once), its
body counting the healthy replicas. Both open
(no token), 503s in the OpenAI error shape. Real loopback sockets."""

from __future__ import annotations

import json
import socket
from typing import Any

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

TOKENS: dict[str, Any] = {
    "tenants": [{"name": "acme", "api_keys": ["sk-acme"]}],
    "admin": {"token": "admin-s3cret"},
    "metrics": {"token": "scrape-s3cret"},
}


def _closed_port_url() -> str:
    """A loopback URL nothing listens on (a replica that is down or still starting)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return resp.status, json.loads(await resp.read())


def _openai_503(body: Any, code: str) -> str:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("service_unavailable", code, None)
    return str(error["message"])


async def test_probes_answer_200_without_a_token_when_a_replica_is_healthy(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("LORAGATE_METRICS_TOKEN", raising=False)
    cfg = gateway_config([replicas[0].url, _closed_port_url()], **TOKENS)
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        assert await _get(http, gw.url + "/livez") == (200, {"status": "ok"})
        ready = {"status": "ok", "replicas_healthy": 1, "replicas": 2}
        assert await _get(http, gw.url + "/readyz") == (200, ready)
        assert (await _get(http, gw.url + "/health"))[0] == 200
        async with http.head(gw.url + "/readyz") as resp:
            assert resp.status == 200


async def test_with_no_healthy_replica_livez_and_readyz_are_200_and_health_is_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replica health does not take the gateway out of its Service: with every replica down
    (vLLM starting), /readyz stays 200 and says so in its body (requests get the 503 that says
    why); /health keeps its 503."""
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("LORAGATE_METRICS_TOKEN", raising=False)
    cfg = gateway_config([_closed_port_url(), _closed_port_url()], **TOKENS)
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        assert await _get(http, gw.url + "/livez") == (200, {"status": "ok"})
        status, body = await _get(http, gw.url + "/readyz")
        assert (status, body) == (200, {"status": "ok", "replicas_healthy": 0, "replicas": 2})
        assert (await _get(http, gw.url + "/health"))[0] == 503  # the same verdict, as before


async def test_readyz_is_503_once_a_shutdown_began(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        assert (await _get(http, gw.url + "/readyz"))[0] == 200
        gw.gateway.shutting_down = True  # what the runner sets when a shutdown begins
        status, body = await _get(http, gw.url + "/readyz")
        assert status == 503
        assert "shutting down" in _openai_503(body, "shutting_down")
        assert await _get(http, gw.url + "/livez") == (200, {"status": "ok"})
        assert (await _get(http, gw.url + "/health"))[0] == 200  # kept as it was


async def test_a_wrong_method_on_a_probe_is_a_405_counted_as_health(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for path in ("/livez", "/readyz"):
            async with http.post(gw.url + path) as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "GET,HEAD"
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'loragate_endpoint_errors_total{endpoint="health",status="405"} 2.0' in text
