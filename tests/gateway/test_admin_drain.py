"""Draining a replica through the admin API (``POST`` / ``DELETE /admin/replicas/{id}/drain``),
one gateway with the embedded store, in front of scripted replicas on loopback; the openai SDK
is the client. The shared side (two instances on one Redis) is in test_shared_drain.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.gateway import load_config, running_gateway

TOKEN = "drain-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.request(method, url, headers=AUTH if headers is None else headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def _routed_to(client: openai.AsyncOpenAI, model: str = BASE) -> str:
    raw = await client.completions.with_raw_response.create(model=model, prompt="x", max_tokens=2)
    return raw.headers["x-loragate-replica"]


def _gauge(text: str, replica: str) -> str:
    prefix = f'loragate_replica_draining{{replica="{replica}"}} '
    return next(line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix))


async def test_a_stream_under_way_finishes_after_its_drain_while_new_requests_go_elsewhere(
    replicas: list[ScriptedReplica],
) -> None:
    r0 = replicas[0]
    gate = asyncio.Event()
    r0.stream_gate = gate  # r0 holds its streams after their first event
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN}, routing="round_robin")
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        raw = await client.completions.with_raw_response.create(
            model=BASE, prompt="x", max_tokens=3, stream=True
        )
        assert raw.headers["x-loragate-replica"] == "r0"  # round_robin starts with r0
        stream = raw.parse()
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices[0].text == " one"

        status, body = await _call(http, "POST", gw.url + "/admin/replicas/r0/drain")
        assert status == 200, body
        assert body["id"] == "r0" and body["draining"] is True
        assert isinstance(body["draining_for_s"], float)
        # The stream is counted where it runs: this instance's count and every instance's.
        assert (body["in_flight"], body["in_flight_here"]) == (1, 1)
        assert body["healthy"] is True

        # New requests, however many, go to the other replica while the stream runs on.
        assert [await _routed_to(client) for _ in range(6)] == ["r1"] * 6
        assert len(r0.requests) == 1

        gate.set()
        assert [c.choices[0].text async for c in it] == [" two", " three"]
        status, body = await _call(http, "GET", gw.url + "/admin/replicas/r0")
        assert status == 200, body
        assert (body["draining"], body["in_flight"], body["in_flight_here"]) == (True, 0, 0)
        assert [await _routed_to(client) for _ in range(2)] == ["r1", "r1"]

        # Undrained: both replicas get requests again.
        status, body = await _call(http, "DELETE", gw.url + "/admin/replicas/r0/drain")
        assert status == 200, body
        assert (body["draining"], body["draining_for_s"]) == (False, None)
        assert sorted([await _routed_to(client) for _ in range(4)]) == ["r0", "r0", "r1", "r1"]


async def test_drain_and_undrain_are_idempotent_and_shown_everywhere(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for _ in range(2):
            status, body = await _call(http, "POST", gw.url + "/admin/replicas/r1/drain")
            assert (status, body["draining"]) == (200, True), body
        status, body = await _call(http, "GET", gw.url + "/admin/replicas")
        assert status == 200
        assert {r["id"]: r["draining"] for r in body["replicas"]} == {"r0": False, "r1": True}
        async with http.get(gw.url + "/health") as resp:
            health = await resp.json()
        assert resp.status == 200
        # Drained is not unhealthy: an operator's doing.
        assert (health["status"], health["replicas_healthy"]) == ("ok", 2)
        assert health["replicas_draining"] == 1
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert (_gauge(text, "r0"), _gauge(text, "r1")) == ("0.0", "1.0")

        for _ in range(2):
            status, body = await _call(http, "DELETE", gw.url + "/admin/replicas/r1/drain")
            assert (status, body["draining"]) == (200, False), body
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert _gauge(text, "r1") == "0.0"


async def test_every_replica_draining_is_the_503_no_replica_error_saying_so(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        for rid in ("r0", "r1"):
            status, _ = await _call(http, "POST", f"{gw.url}/admin/replicas/{rid}/drain")
            assert status == 200
        for stream in (False, True):
            try:
                await client.completions.create(
                    model="lora-0", prompt="x", max_tokens=2, stream=stream
                )
            except openai.APIStatusError as exc:
                err = exc.response.json()["error"]
                assert exc.status_code == 503
                assert err["code"] == "no_replica_available"
                assert "every replica is draining (r0, r1)" in err["message"], err
            else:
                raise AssertionError("a request was served while every replica drains")
        assert not replicas[0].requests and not replicas[1].requests
        # One of them back: served.
        status, _ = await _call(http, "DELETE", gw.url + "/admin/replicas/r1/drain")
        assert status == 200
        assert await _routed_to(client, "lora-0") == "r1"


async def test_unknown_replica_is_404_and_a_missing_token_401(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for method, path in (
            ("POST", "/admin/replicas/r9/drain"),
            ("DELETE", "/admin/replicas/r9/drain"),
            ("GET", "/admin/replicas/r9"),
        ):
            status, body = await _call(http, method, gw.url + path)
            assert status == 404, (method, body)
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["param"] == "id"
            assert "'r9'" in body["error"]["message"]
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                status, body = await _call(http, method, gw.url + path.replace("r9", "r0"), headers)
                assert status == 401, (method, headers, body)
                assert body["error"]["code"] == "invalid_api_key"
        assert not gw.gateway.pool.is_draining("r0")


async def test_a_wrong_method_on_a_drain_path_names_post_and_delete_only(
    replicas: list[ScriptedReplica],
) -> None:
    """Before, ``PUT /admin/replicas/r0/drain`` answered 405 with ``Allow: DELETE,GET,HEAD,POST``
    (the route ``GET /admin/replicas/{id:.+}`` matches the path), though a GET there is a 405
    too. A replica whose id is ``x/drain`` does take GET at its path."""
    cfg = gateway_config(
        [r.url for r in replicas],
        admin={"token": TOKEN},
        replicas=[{"id": "r0", "url": replicas[0].url}, {"id": "x/drain", "url": replicas[1].url}],
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for method, path, allow in (
            ("PUT", "/admin/replicas/r0/drain", "DELETE,POST"),
            ("PATCH", "/admin/replicas/r9/drain", "DELETE,POST"),  # no such replica: the same
            ("PUT", "/admin/replicas/a%2Fb/drain", "DELETE,POST"),  # an id with a slash
            ("GET", "/admin/replicas/r0/drain", "DELETE,POST"),
            ("HEAD", "/admin/replicas/r0/drain", "DELETE,POST"),
            ("PUT", "/admin/replicas/x/drain", "DELETE,GET,HEAD,POST"),  # replica 'x/drain'
            ("PUT", "/admin/replicas/r0", "GET,HEAD"),
        ):
            async with http.request(method, gw.url + path, headers=AUTH) as resp:
                assert (resp.status, resp.headers.get("Allow")) == (405, allow), (method, path)
                if method != "HEAD":
                    error = (await resp.json())["error"]
                    assert error["code"] == "method_not_allowed"
                    assert error["message"].endswith(f"(allowed: {allow.replace(',', ', ')})")
        # The drain itself still works.
        status, body = await _call(http, "POST", gw.url + "/admin/replicas/r0/drain")
        assert status == 200 and body["draining"] is True


async def test_a_draining_replica_is_still_polled_and_its_adapter_load_under_way_finishes(
    replicas: list[ScriptedReplica],
) -> None:
    r0, _ = replicas
    r0.load_delay_s = 0.5  # the load a request waits for is under way when the drain comes
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN}, routing="round_robin")
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        pool = gw.gateway.pool
        first = asyncio.ensure_future(
            client.completions.with_raw_response.create(model="lora-0", prompt="x", max_tokens=2)
        )
        for _ in range(200):  # hang guard, not a timing assertion
            if pool.loading("r0"):
                break
            await asyncio.sleep(0.01)
        status, body = await _call(http, "POST", gw.url + "/admin/replicas/r0/drain")
        assert status == 200, body
        assert body["adapter_loads_under_way_here"] == ["lora-0"]
        assert body["in_flight_here"] == 1
        raw = await asyncio.wait_for(first, timeout=10)
        assert raw.headers["x-loragate-replica"] == "r0"
        assert "lora-0" in r0.adapters
        assert await _routed_to(client, "lora-0") == "r1"

        # Polled as before: health and residency follow the replica.
        r0.health_status = 503
        await pool.poll_once()
        status, body = await _call(http, "GET", gw.url + "/admin/replicas/r0")
        assert (body["healthy"], body["draining"]) == (False, True)
        r0.health_status = 200
        r0.adapters["outside"] = "/loras/outside"  # loaded on r0 outside loragate
        await pool.poll_once()
        status, body = await _call(http, "GET", gw.url + "/admin/replicas/r0")
        assert (body["healthy"], body["draining"]) == (True, True)
        assert "outside" in body["residency"]["registered"]
        assert await _routed_to(client, "lora-0") == "r1"


def _write(path: Path, replicas: list[ScriptedReplica]) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "routing": "round_robin",
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def test_a_reload_keeps_a_drain_and_a_replica_removed_keeps_it_too(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    """A drain lasts until it is ended: removing the replica from the config does not end it
    (with Redis, instances not reloaded yet still route by it), a replica added back under the
    id is drained still, and the drain can be ended while no config has the replica."""
    r0, r1 = replicas
    path = _write(tmp_path / "gw.yaml", [r0, r1])
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        for rid in ("r0", "r1"):
            status, _ = await _call(http, "POST", f"{gw.url}/admin/replicas/{rid}/drain")
            assert status == 200
        # r1 leaves the config: both drains stay; r1's is shown apart.
        _write(path, [r0])
        status, body = await _call(http, "POST", gw.url + "/admin/reload")
        assert status == 200, body
        assert body["replicas_removed"] == ["r1"]
        status, body = await _call(http, "GET", gw.url + "/admin/replicas/r0")
        assert (body["draining"], body["configured_here"]) == (True, True)
        status, body = await _call(http, "GET", gw.url + "/admin/replicas")
        assert [r["id"] for r in body["replicas"]] == ["r0"]
        assert [r["id"] for r in body["drained_not_configured"]] == ["r1"]
        status, body = await _call(http, "GET", gw.url + "/admin/replicas/r1")
        assert status == 200, body
        assert (body["configured_here"], body["draining"], body["url"]) == (False, True, r1.url)
        assert "r1" in gw.gateway.shared.drains()
        # r1 comes back under the same id: drained still; r0 too.
        _write(path, [r0, r1])
        status, body = await _call(http, "POST", gw.url + "/admin/reload")
        assert (status, body["replicas_added"]) == (200, ["r1"]), body
        status, body = await _call(http, "GET", gw.url + "/admin/replicas")
        assert {r["id"]: r["draining"] for r in body["replicas"]} == {"r0": True, "r1": True}
        assert body["drained_not_configured"] == []
        # r1 leaves again, and its drain is ended while no config has it: back, it is routed.
        _write(path, [r0])
        status, body = await _call(http, "POST", gw.url + "/admin/reload")
        assert status == 200, body
        status, body = await _call(http, "DELETE", gw.url + "/admin/replicas/r1/drain")
        assert status == 200, body
        assert (body["configured_here"], body["draining"]) == (False, False)
        status, body = await _call(http, "DELETE", gw.url + "/admin/replicas/r1/drain")
        assert status == 200, body  # idempotent: the shared registry still knows r1
        status, body = await _call(http, "POST", gw.url + "/admin/replicas/r1/drain")
        assert (status, body["configured_here"], body["draining"]) == (200, False, True), body
        status, body = await _call(http, "DELETE", gw.url + "/admin/replicas/r1/drain")
        assert (status, body["draining"]) == (200, False), body
        _write(path, [r0, r1])
        status, body = await _call(http, "POST", gw.url + "/admin/reload")
        assert (status, body["replicas_added"]) == (200, ["r1"]), body
        assert [await _routed_to(client) for _ in range(3)] == ["r1"] * 3
