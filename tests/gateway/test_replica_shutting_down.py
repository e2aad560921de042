"""A replica draining under ``--shutdown-timeout N`` (vLLM 0.32, measured: after SIGTERM it
keeps listening for N s, ``/health`` answers 200, the requests in flight go on, a new
completion, chat or stream gets a 500 "cannot schedule new futures after shutdown", a new
adapter load a 500 "Server shutting down"): the gateway retries such a request on another
replica (``engine_stopped``; a load: ``load_failed``, no refusal recorded) and keeps the replica
out of rotation although its polls succeed, until a poll fails or the hold's bound passes.
Before, those 500s reached the client (helper D: 10 of 20 requests through a round-robin
gateway) and a load's was remembered as a refusal of the adapter.

Over loopback: ``loragate replica --shutdown-timeout`` as a subprocess, SIGTERMed with a long
request in flight; a second simulated replica; the openai SDK as the client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from draining import DRAIN_500, draining_replica
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving_replicas,
)
from metric_counts import counts

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from vllm_stub import vllm_error

TOKEN = "shutting-s3cret"


async def _replica_json(http: aiohttp.ClientSession, url: str, rid: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(url + "/admin/replicas/" + rid, headers=auth) as resp:
        assert resp.status == 200
        out: dict[str, Any] = await resp.json()
        return out


@pytest.mark.parametrize("stream", [False, True])
async def test_requests_sent_while_a_replica_drains_are_all_answered(stream: bool) -> None:
    other = ReplicaConfig(served_model_name=BASE, profile="fast", seed=1)
    async with (
        aiohttp.ClientSession() as http,
        draining_replica(http) as r0_url,
        run_replica(other, port=0) as r1,
    ):
        cfg = gateway_config([r0_url, r1.url], routing="round_robin", admin={"token": TOKEN})
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            served = []
            for i in range(8):
                if i == 4:  # a poll: /health still says 200, the replica stays out
                    await gw.gateway.pool.poll_once()
                raw = await client.completions.with_raw_response.create(
                    model=BASE, prompt="p", max_tokens=2, stream=stream
                )
                answer = raw.parse()
                chunks = [c async for c in answer] if stream else [answer]
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
                served.append(raw.headers["X-Loragate-Replica"])
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
            requests = await counts(http, gw.url, "loragate_requests_total")
            r0 = await _replica_json(http, gw.url, "r0")
            async with http.get(gw.url + "/metrics") as resp:
                metrics = await resp.text()
    assert served == ["r1"] * 8
    assert retries == {("r0", "engine_stopped"): 1}  # the first request routed there
    assert requests == {("r1", "200"): 8}
    assert r0["healthy"] is False and r0["stopping_hold_left_s"] > 0
    assert "shutting down" in r0["last_error"] and DRAIN_500 in r0["last_error"]
    assert 'loragate_replica_healthy{replica="r0"} 0.0' in metrics


async def test_a_load_a_draining_replica_refuses_is_retried_and_not_a_refusal(
    tmp_path: Path,
) -> None:
    adapters = [
        {"name": f"lora-{i}", "path": write_adapter_folder(str(tmp_path / f"l{i}"), rank=8)}
        for i in range(2)
    ]
    other = ReplicaConfig(served_model_name=BASE, profile="fast", seed=1, enable_lora=True)
    async with (
        aiohttp.ClientSession() as http,
        draining_replica(http) as r0_url,
        run_replica(other, port=0) as r1,
    ):
        cfg = gateway_config(
            [r0_url, r1.url], routing="round_robin", adapters=adapters, admin={"token": TOKEN}
        )
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            served = []
            for name in ("lora-0", "lora-1", "lora-0", "lora-1"):
                raw = await client.completions.with_raw_response.create(
                    model=name, prompt="p", max_tokens=2
                )
                assert raw.parse().choices[0].finish_reason == "length"
                served.append(raw.headers["X-Loragate-Replica"])
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
            r0 = await _replica_json(http, gw.url, "r0")
    assert served == ["r1"] * 4
    assert retries == {("r0", "load_failed"): 1}
    assert r0["refused_adapters"] == {}  # the replica's state, not the adapter's
    assert r0["healthy"] is False and "Server shutting down" in r0["last_error"]


class DrainingScripted(ScriptedReplica):
    """Answers completions with a 500 of vLLM's (``fail_with``, ``fail_type``) when set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.fail_with: str | None = None
        self.fail_type = "InternalServerError"

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.fail_with is None:
            return await super()._answer(request)
        self.requests.append(await request.json())
        return vllm_error(500, self.fail_with, self.fail_type)


@pytest.fixture
async def scripted() -> AsyncIterator[list[DrainingScripted]]:
    async with serving_replicas(DrainingScripted) as out:
        yield out


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (DRAIN_500 + ".", "InternalServerError"),  # not vLLM's exact words
        ("RuntimeError: " + DRAIN_500, "InternalServerError"),
        (DRAIN_500, "BadRequestError"),  # not its 500's type
    ],
)
async def test_only_vllms_exact_drain_500_is_retried(
    scripted: list[DrainingScripted], message: str, kind: str
) -> None:
    r0, r1 = scripted
    r0.fail_with, r0.fail_type = message, kind
    cfg = gateway_config([r.url for r in scripted], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert message in str(caught.value)
        assert len(r1.requests) == 0
        assert [s.replica_id for s in gw.gateway.pool.healthy_snapshots()] == ["r0", "r1"]
        # vLLM's exact answer (a 500 InternalServerError with those words) is retried.
        r0.fail_with, r0.fail_type = DRAIN_500, "InternalServerError"
        await client.completions.create(model=BASE, prompt="p", max_tokens=1)  # r1
        done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)  # r0
        assert done.choices[0].text == "hi from r1"
        assert [s.replica_id for s in gw.gateway.pool.healthy_snapshots()] == ["r1"]


async def test_the_hold_ends_when_a_poll_fails_or_its_bound_passes(
    scripted: list[DrainingScripted],
) -> None:
    r0 = scripted[0]
    r0.fail_with = DRAIN_500
    cfg = gateway_config([r.url for r in scripted], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        pool = gw.gateway.pool

        def healthy() -> list[str]:
            return [s.replica_id for s in pool.healthy_snapshots()]

        done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r1"
        await pool.poll_once()
        assert healthy() == ["r1"]  # /health 200, still held
        # It went away (a poll failed) and came back: a new server, in rotation.
        r0.health_status = 503
        await pool.poll_once()
        r0.health_status = 200
        await pool.poll_once()
        assert healthy() == ["r0", "r1"]
        assert pool.last_error("r0") is None
        # Held again, with a bound already past: the next successful poll brings it back.
        pool.stopping_hold_s = 0.0
        await client.completions.create(model=BASE, prompt="p", max_tokens=1)  # r0, retried
        assert healthy() == ["r1"]
        r0.fail_with = None
        await pool.poll_once()
        assert healthy() == ["r0", "r1"]
        assert len(r0.requests) == 2
