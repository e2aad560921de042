"""An adapter's configured path against the path each replica holds it from (its ``/v1/models``
card's ``root``): a replica holding it from another path is reloaded in place, and never gets
a request for it while it holds the other weights. Over loopback, with simulated vLLM 0.32
replicas (``loragate.twin``) and the openai SDK."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, openai_client, serving, wait_until

from loragate.core.config import config_from_mapping
from loragate.gateway import load_config, running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

TOKEN = "paths-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def twins() -> AsyncIterator[list[RunningReplica]]:
    """Two simulated replicas (LoRA on, 2 slots)."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for seed in range(2):
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=2, max_cpu_loras=4,
                max_lora_rank=16, seed=seed, time_scale=50.0,
            )  # fmt: skip
            out.append(await stack.enter_async_context(run_replica(cfg, port=0)))
        yield out


def _folders(tmp_path: Path) -> tuple[str, str]:
    return (
        write_adapter_folder(str(tmp_path / "v1" / "lora-0"), rank=8),
        write_adapter_folder(str(tmp_path / "v2" / "lora-0"), rank=8),
    )


def _doc(urls: list[str], path: str) -> dict[str, Any]:
    return {
        "base_model": BASE,
        "replicas": [{"id": f"r{i}", "url": u} for i, u in enumerate(urls)],
        "adapters": [{"name": "lora-0", "path": path, "rank": 8}],
        "routing": "round_robin",
        "poller": {"interval_s": 3600},  # no background polls: the test says when
        "admin": {"token": TOKEN},
    }


async def _roots(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.get(url + "/v1/models") as resp:
        data = (await resp.json())["data"]
    return {m["id"]: m["root"] for m in data if m["parent"] is not None}


async def _admin_adapter(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/admin/adapters", headers=AUTH) as resp:
        (item,) = (await resp.json())["adapters"]
    return dict(item)


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_path_changed_by_a_reload_is_reloaded_in_place_on_every_replica(
    twins: list[RunningReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = _folders(tmp_path)
    urls = [r.url for r in twins]
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(_doc(urls, old)), encoding="utf-8")
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        served = set()
        for _ in range(2):  # round robin: one on each replica, each loads lora-0 from v1
            raw = await client.completions.with_raw_response.create(
                model="lora-0", prompt="x", max_tokens=2
            )
            served.add(raw.headers["x-loragate-replica"])
        assert served == {"r0", "r1"}
        for url in urls:
            assert await _roots(http, url) == {"lora-0": old}

        path.write_text(yaml.safe_dump(_doc(urls, new)), encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="loragate.backends.pool"):
            async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()
            # Both replicas are reloaded in place without waiting for a request or a poll.
            for url in urls:
                await wait_until(
                    lambda u=url: gw.gateway.pool.is_registered(_rid(urls, u), "lora-0"),
                    f"lora-0 reloaded on {url}",
                    timeout_s=10,
                )
                assert await _roots(http, url) == {"lora-0": new}
        logged = _warnings(caplog)
        for rid in ("r0", "r1"):
            assert f"replica {rid} (" in logged
        assert f"lora-0 registered from {old}, not from the configured {new}" in logged

        for _ in range(2):
            done = await client.completions.create(model="lora-0", prompt="x", max_tokens=2)
            assert done.model == "lora-0"
        await gw.gateway.pool.poll_once()  # the replicas' own word agrees
        item = await _admin_adapter(http, gw.url)
        assert (item["path"], item["registered_on"], item["stale_on"]) == (new, ["r0", "r1"], {})


def _rid(urls: list[str], url: str) -> str:
    return f"r{urls.index(url)}"


async def test_a_replica_holding_the_adapter_from_another_path_at_start_is_reloaded(
    twins: list[RunningReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = _folders(tmp_path)
    replica = twins[0]
    async with aiohttp.ClientSession() as http:
        # Loaded there before the gateway started (another gateway, an older config, by hand).
        body = {"lora_name": "lora-0", "lora_path": old}
        async with http.post(replica.url + "/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 200
        config = config_from_mapping(_doc([replica.url], new))
        with caplog.at_level(logging.WARNING, logger="loragate.backends.pool"):
            async with running_gateway(config, port=0) as gw, openai_client(gw.url) as client:
                await wait_until(
                    lambda: gw.gateway.pool.is_registered("r0", "lora-0"),
                    "lora-0 reloaded in place",
                    timeout_s=10,
                )
                assert await _roots(http, replica.url) == {"lora-0": new}
                done = await client.completions.create(model="lora-0", prompt="x", max_tokens=2)
                assert done.model == "lora-0"
    logged = _warnings(caplog)
    assert f"replica r0 ({replica.url}) has adapter lora-0 registered from {old}" in logged
    assert f"not from the configured {new}" in logged


async def test_a_replica_that_cannot_reload_in_place_gets_no_request_for_the_adapter(
    twins: list[RunningReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """r1 holds lora-0 from /loras/lora-0 and cannot read the configured folder (its
    in-place load answers vLLM's 404): every lora-0 request goes to r0, none to r1."""
    _, new = _folders(tmp_path)
    stale = ScriptedReplica("r1")
    stale.adapters["lora-0"] = "/loras/lora-0"
    async with contextlib.AsyncExitStack() as stack:
        stale.url, _ = await stack.enter_async_context(serving(stale.app))
        urls = [twins[0].url, stale.url]
        with caplog.at_level(logging.WARNING, logger="loragate.backends.pool"):
            gw = await stack.enter_async_context(
                running_gateway(config_from_mapping(_doc(urls, new)), port=0)
            )
            client = await stack.enter_async_context(openai_client(gw.url))
            http = await stack.enter_async_context(aiohttp.ClientSession())
            for _ in range(4):
                raw = await client.completions.with_raw_response.create(
                    model="lora-0", prompt="x", max_tokens=2
                )
                assert raw.headers["x-loragate-replica"] == "r0"
            # The base model still goes round robin: r1 is in rotation.
            for _ in range(2):
                await client.completions.create(model=BASE, prompt="x", max_tokens=2)
        assert not [r for r in stale.requests if r.get("model") == "lora-0"]
        assert len(stale.requests) >= 1
        assert stale.adapters == {"lora-0": "/loras/lora-0"}  # the in-place load was refused
        logged = _warnings(caplog)
        assert f"replica r1 ({stale.url}) has adapter lora-0 registered from /loras/lora-0, " \
            f"not from the configured {new}" in logged  # fmt: skip
        assert "failed to load on replica r1" in logged and "stays registered there" in logged
        item = await _admin_adapter(http, gw.url)
        assert item["registered_on"] == ["r0"]
        assert item["stale_on"] == {"r1": "/loras/lora-0"}
