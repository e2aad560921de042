"""Every answer of the gateway carries ``X-Request-Id``, not only the completion endpoints':
``GET /v1/models``, the probes, ``/metrics``, the admin API, unknown paths (404) and wrong
methods (405) in the OpenAI error shape, and aiohttp's answers to requests it cannot parse: the
client's id when safe, else one from the same generator as the completions' ids. The adapter
loads and unloads the gateway sends a replica on behalf of a request carry that request's id
(``<id>-<try>-load`` for a completion's on-demand load, ``<id>-load-<k>`` for an admin
registration's, ``<id>-unload-<k>`` for a deletion's), and the load's log line names both.
In-process gateways over loopback, scripted replicas that record the admin calls' headers, the
openai SDK and aiohttp as clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client, serving

from loragate.gateway import RunningGateway, running_gateway

TOKEN = "admin-t"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TENANT = {"Authorization": "Bearer sk-acme"}
TENANTS = [{"name": "acme", "api_keys": ["sk-acme"]}]
GENERATED = re.compile(r"([0-9a-f]{12})-[0-9]+")
POOL_LOG = "loragate.backends.pool"

# (method, path, headers, status): one request to each endpoint the proxy does not handle.
ENDPOINTS = [
    ("GET", "/v1/models", TENANT, 200),
    ("GET", "/v1/models", {}, 401),
    ("GET", "/health", {}, 200),
    ("GET", "/livez", {}, 200),
    ("GET", "/readyz", {}, 200),
    ("GET", "/metrics", {}, 200),
    ("GET", "/admin/replicas", ADMIN, 200),
    ("GET", "/admin/replicas/r0", ADMIN, 200),
    ("GET", "/admin/adapters", ADMIN, 200),
    ("GET", "/admin/adapters", {}, 401),
    ("GET", "/admin/nothing-here", ADMIN, 404),
    ("GET", "/no/such/path", {}, 404),
    ("GET", "/v1/completions", {}, 405),
    ("DELETE", "/health", {}, 405),
]


class RecordingReplica(ScriptedReplica):
    """A scripted replica that records each admin call: (path, lora_name, X-Request-Id)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.admin_calls: list[tuple[str, str, str | None]] = []

    async def _record(self, request: web.Request) -> None:
        body = await request.json()
        self.admin_calls.append(
            (request.path, body.get("lora_name"), request.headers.get("X-Request-Id"))
        )

    async def _load(self, request: web.Request) -> web.Response:
        await self._record(request)
        return await super()._load(request)

    async def _unload(self, request: web.Request) -> web.Response:
        await self._record(request)
        return await super()._unload(request)


@pytest.fixture
async def replica() -> AsyncIterator[RecordingReplica]:
    rep = RecordingReplica("r0")
    async with serving(rep.app) as (url, _):
        rep.url = url
        yield rep


@contextlib.asynccontextmanager
async def _gateway(rep: RecordingReplica) -> AsyncIterator[RunningGateway]:
    cfg = gateway_config([rep.url], tenants=TENANTS, admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw:
        yield gw


async def _call(
    http: aiohttp.ClientSession, gw: RunningGateway, method: str, path: str, headers: dict[str, str]
) -> tuple[int, str | None, bytes]:
    async with http.request(method, gw.url + path, headers=headers) as resp:
        return resp.status, resp.headers.get("X-Request-Id"), await resp.read()


async def test_every_endpoint_answers_with_a_generated_id_from_the_one_generator(
    replica: RecordingReplica,
) -> None:
    async with (
        _gateway(replica) as gw,
        aiohttp.ClientSession() as http,
        openai_client(gw.url, "sk-acme") as sdk,
    ):
        completion = await sdk.completions.with_raw_response.create(
            model=BASE, prompt="p", max_tokens=1
        )
        ids = [completion.headers["x-request-id"]]
        for method, path, headers, status in ENDPOINTS:
            got, rid, body = await _call(http, gw, method, path, headers)
            assert got == status, (method, path, body)
            assert rid is not None, (method, path)
            ids.append(rid)
            if status in (404, 405):  # the OpenAI error shape
                err = json.loads(body)["error"]
                assert set(err) == {"message", "type", "param", "code"}, err
    # Generated (no client id), unique, and all of this instance's prefix: one generator.
    matches = [GENERATED.fullmatch(i) for i in ids]
    assert all(matches), ids
    assert len({m.group(1) for m in matches if m}) == 1, ids
    assert len(set(ids)) == len(ids), ids


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("ops-trace/42:a", True), ("has spaces in it", False), ("x" * 129, False)],
    ids=["safe", "spaces", "too-long"],
)
async def test_a_safe_client_id_is_echoed_and_an_unsafe_one_replaced(
    replica: RecordingReplica, sent: str, echoed: bool
) -> None:
    async with _gateway(replica) as gw, aiohttp.ClientSession() as http:
        for method, path, headers, status in ENDPOINTS:
            got, rid, _ = await _call(http, gw, method, path, {**headers, "X-Request-Id": sent})
            assert got == status, (method, path)
            if echoed:
                assert rid == sent, (method, path, rid)
            else:
                assert rid is not None and GENERATED.fullmatch(rid), (method, path, rid)


async def test_a_request_aiohttp_cannot_parse_gets_an_id_too(replica: RecordingReplica) -> None:
    async with _gateway(replica) as gw:
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            writer.write(b"GET /health HTTP/1.1 trailing junk\r\nHost: gw\r\n\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), timeout=30)
        finally:
            writer.close()
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert re.match(r"HTTP/1\.[01] 400 ", head), head
    found = re.search(r"(?im)^X-Request-Id: (\S+)\r?$", head)
    assert found is not None and GENERATED.fullmatch(found.group(1)), head


async def test_the_models_endpoints_refusal_is_logged_with_its_id(
    replica: RecordingReplica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loragate.gateway")
    async with _gateway(replica) as gw, aiohttp.ClientSession() as http:
        got, rid, _ = await _call(http, gw, "GET", "/v1/models", {"X-Request-Id": "probe-9"})
    assert (got, rid) == (401, "probe-9")
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(lines) == 1 and "GET /v1/models" in lines[0] and "request probe-9" in lines[0]


async def test_an_on_demand_load_carries_the_requests_id(
    replica: RecordingReplica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=POOL_LOG)
    async with _gateway(replica) as gw, openai_client(gw.url, "sk-acme") as sdk:
        first = await sdk.completions.with_raw_response.create(
            model="lora-0", prompt="p", max_tokens=1
        )
        mine = await sdk.completions.with_raw_response.create(
            model="lora-1", prompt="p", max_tokens=1, extra_headers={"X-Request-Id": "job-7"}
        )
    rid = first.headers["x-request-id"]
    assert mine.headers["x-request-id"] == "job-7"
    (load0, load1) = replica.admin_calls
    assert load0 == ("/v1/load_lora_adapter", "lora-0", f"{rid}-1-load")
    path, name, sent = load1
    assert (path, name) == ("/v1/load_lora_adapter", "lora-1")
    # A client's id gets the gateway's own between (clients may reuse theirs), as a try's does.
    assert sent is not None and re.fullmatch(r"job-7-[0-9a-f]{12}-[0-9]+-1-load", sent), sent
    lines = [r.getMessage() for r in caplog.records if r.name == POOL_LOG]
    for request_id, load_id in ((rid, f"{rid}-1-load"), ("job-7", sent)):
        said = [m for m in lines if f"request {request_id} " in m and load_id in m]
        assert len(said) == 1 and "loaded" in said[0], lines


async def test_admin_loads_and_unloads_carry_the_admin_requests_id(
    replica: RecordingReplica, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate")
    adapter = {"name": "extra", "path": "/loras/extra", "rank": 8}
    async with _gateway(replica) as gw, aiohttp.ClientSession() as http:
        async with http.post(
            gw.url + "/admin/adapters", json=adapter, headers={**ADMIN, "X-Request-Id": "ops-1"}
        ) as resp:
            assert resp.status == 201, await resp.text()
            assert resp.headers["X-Request-Id"] == "ops-1"
        async with http.delete(gw.url + "/admin/adapters/extra", headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            deleting = resp.headers["X-Request-Id"]
    (load, unload) = replica.admin_calls
    assert load[:2] == ("/v1/load_lora_adapter", "extra")
    assert load[2] is not None and re.fullmatch(r"ops-1-[0-9a-f]{12}-[0-9]+-load-1", load[2])
    assert unload == ("/v1/unload_lora_adapter", "extra", f"{deleting}-unload-1")
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("admin: request ops-1: registered adapter extra") for m in lines)
    assert any(m.startswith(f"admin: request {deleting}: deleted adapter extra") for m in lines)
    assert any("request ops-1 " in m and load[2] in m for m in lines if "load on replica" in m)
