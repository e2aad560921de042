"""Registrations through ``POST /admin/adapters`` and a gateway restart, over real loopback with
twin replicas (``gateway.unknown_adapters``): with the embedded store (the default) the 201
says the registration lives in this process only and the first one is logged; after a restart
the gateway says which adapters the replicas still hold that it no longer serves (one WARNING,
bounded, and ``unknown_registered`` in ``GET /admin/adapters`` and ``/admin/replicas``), and
does not adopt them. With Redis the 201 says ``redis`` and a restart forgets nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import ScriptedReplica, gateway_config
from shared_cluster import AUTH, sdk, shared_config, twin_replicas

from loragate.core.config import GatewayConfig, StateConfig
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer

N_CUSTOMERS = 12  # more than the WARNING names (10)


def _embedded(cfg: GatewayConfig) -> GatewayConfig:
    return dataclasses.replace(cfg, state=StateConfig())


async def _admin(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with http.request(method, url, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_a_restart_with_the_embedded_store_says_what_the_replicas_hold_unserved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(N_CUSTOMERS):
        write_adapter_folder(str(tmp_path / f"cust-{i}"), rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = _embedded(shared_config(replicas, tmp_path, "redis://unused", 1))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        with caplog.at_level(logging.WARNING, logger="loragate.gateway.admin"):
            async with running_gateway(cfg, port=0) as gw:
                for i in range(N_CUSTOMERS):
                    body = {"name": f"cust-{i}", "path": str(tmp_path / f"cust-{i}")}
                    status, answer = await _admin(http, "POST", gw.url + "/admin/adapters", body)
                    assert status == 201, answer
                    assert answer["persisted"] == "memory"
                    assert "lost when it restarts" in answer["warning"]
                    assert "state.backend: redis" in answer["warning"]
        said = [r for r in caplog.records if "embedded state store" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING  # once, not per adapter
        assert "adapter cust-0 " in said[0].getMessage()

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loragate.gateway.unknown_adapters"):
            gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        warnings = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
        assert len(warnings) == 1, warnings
        text = warnings[0]
        assert "replicas hold 12 adapter(s)" in text
        assert "cust-0 (on r" in text and "and 2 more" in text
        assert str(tmp_path / "cust-0") in text  # the path the replica holds it from
        assert "state.backend: memory" in text and "POST /admin/adapters" in text
        assert "lora-0" not in text  # the config file's adapter is served

        status, listed = await _admin(http, "GET", gw.url + "/admin/adapters")
        assert status == 200
        unknown = {u["name"]: u for u in listed["unknown_registered"]}
        assert set(unknown) == {f"cust-{i}" for i in range(N_CUSTOMERS)}
        assert all(len(u["registered_on"]) >= 1 for u in unknown.values())
        rid = unknown["cust-3"]["registered_on"][0]
        assert unknown["cust-3"]["paths"][rid] == str(tmp_path / "cust-3")
        assert "cust-3" not in {a["name"] for a in listed["adapters"]}  # not adopted
        status, reps = await _admin(http, "GET", gw.url + "/admin/replicas")
        held = {name for r in reps["replicas"] for name in r["unknown_registered"]}
        assert held == set(unknown)
        client = await stack.enter_async_context(sdk(gw.url))
        with pytest.raises(openai.NotFoundError):  # not served: nobody knows its tenants
            await client.completions.create(model="cust-3", prompt="x", max_tokens=2)


async def test_a_registration_in_redis_says_so_and_survives_a_restart(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_adapter_folder(str(tmp_path / "cust-1"), rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        with caplog.at_level(logging.WARNING):
            async with running_gateway(cfg, port=0) as gw:
                body = {"name": "cust-1", "path": str(tmp_path / "cust-1")}
                status, answer = await _admin(http, "POST", gw.url + "/admin/adapters", body)
                assert status == 201, answer
                assert answer["persisted"] == "redis" and "warning" not in answer
            gw = await stack.enter_async_context(running_gateway(cfg, port=0))
            status, listed = await _admin(http, "GET", gw.url + "/admin/adapters")
        assert listed["unknown_registered"] == []
        assert "cust-1" in {a["name"] for a in listed["adapters"]}
        assert "embedded state store" not in caplog.text
        assert "does not serve" not in caplog.text
        client = await stack.enter_async_context(sdk(gw.url))
        done = await client.completions.create(model="cust-1", prompt="x", max_tokens=2)
        assert done.choices


async def test_a_replica_that_answers_after_start_up_gets_its_own_warning(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    r0, r1 = replicas
    r0.adapters = {"cust-1": "/loras/cust-1", "lora-0": "/loras/lora-0"}
    r1.adapters = {"cust-1": "/loras/cust-1", "cust-9": "/loras/cust-9"}
    r1.health_status = 503  # down at start-up: its adapters are not known yet
    cfg = gateway_config(
        [r.url for r in replicas], admin={"token": "t"}, poller={"interval_s": 0.05}
    )
    with caplog.at_level(logging.WARNING, logger="loragate.gateway.unknown_adapters"):
        async with running_gateway(cfg, port=0):
            first = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
            assert len(first) == 1, first
            assert "1 adapter(s)" in first[0] and "cust-1 (on r0, from /loras/cust-1)" in first[0]
            r1.health_status = 200
            for _ in range(200):  # bounded: until r1 answered a poll and was checked
                said = [
                    r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()
                ]
                if len(said) > 1:
                    break
                await asyncio.sleep(0.05)
    assert len(said) == 2, said
    assert "1 adapter(s)" in said[1] and "cust-9 (on r1, from /loras/cust-9)" in said[1]
    assert "cust-1" not in said[1]  # named once


async def test_a_restart_while_redis_is_down_names_only_adapters_really_unknown(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Started with Redis unreachable, the catalog lacks what was registered there: the check
    waits for the first sync, then names only the adapter loaded outside loragate."""
    for name in ("cust-1", "by-hand"):
        write_adapter_folder(str(tmp_path / name), rank=8)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        body = {"lora_name": "by-hand", "lora_path": str(tmp_path / "by-hand")}
        async with http.post(replicas[0].url + "/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 200, await resp.text()  # loaded outside loragate
        async with running_gateway(cfg, port=0) as gw:
            body = {"name": "cust-1", "path": str(tmp_path / "cust-1")}
            status, answer = await _admin(http, "POST", gw.url + "/admin/adapters", body)
            assert status == 201 and answer["persisted"] == "redis", answer
        redis_server.stop(save=True)
        caplog.clear()  # the first run named by-hand
        with caplog.at_level(logging.INFO, logger="loragate.gateway.unknown_adapters"):
            gw = await stack.enter_async_context(running_gateway(cfg, port=0))
            assert "waits for it" in caplog.text  # deferred, said once
            assert "does not serve" not in caplog.text
            redis_server.start()
            client = await stack.enter_async_context(sdk(gw.url))
            said: list[str] = []
            for _ in range(200):  # bounded: until the first sync and the check after it
                said = [
                    r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()
                ]
                if said:
                    break
                await asyncio.sleep(0.05)
        assert len(said) == 1, said
        assert "1 adapter(s)" in said[0] and "by-hand (on r0" in said[0]
        assert "cust-1" not in said[0]  # in Redis: served, not unknown
        assert caplog.text.count("waits for it") == 1
        done = await client.completions.create(model="cust-1", prompt="x", max_tokens=2)
        assert done.choices
        status, listed = await _admin(http, "GET", gw.url + "/admin/adapters")
        assert [u["name"] for u in listed["unknown_registered"]] == ["by-hand"]
