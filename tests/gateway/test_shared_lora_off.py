"""Two gateway instances on one real redis-server share what one finds of a replica that serves
no adapters (vLLM without ``--enable-lora``: a 500 "LoRA is not enabled" to every load).

Before: each instance found it out for itself, through a client request of its own that paid a
failed load and a retry (one per instance). Now the finding rides the shared refusals (as the
refusal of the LoRA check load, ``backends.lora_off``): the other instance leaves the replica
out of adapter requests from its next state refresh, without a retry, and when the replica
comes back with LoRA (restarted at the same URL), the check of the instance that finds so ends
the finding for both. Over loopback with simulated vLLM 0.32 replicas and the openai SDK; every
wait is bounded, no timing is asserted."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from gateway_harness import openai_client, wait_until
from shared_cluster import eventually

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.gateway import RunningGateway, running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from redis_fixture import RedisServer

TOKEN = "admin-s3cret"
ADAPTERS = [f"a{i}" for i in range(4)]
WAIT_S = 30.0  # the longest a test waits for another instance to see a write (a hang guard)


def _twin(port: int = 0, **kw: Any) -> Any:
    cfg = ReplicaConfig(served_model_name="m", max_loras=2, time_scale=50.0, **kw)
    return run_replica(cfg, port=port)


def _config(tmp_path: Path, urls: list[str], redis_url: str) -> GatewayConfig:
    for name in ADAPTERS:
        write_adapter_folder(str(tmp_path / name), rank=8)
    return config_from_mapping(
        {
            "base_model": "m",
            "replicas": [{"id": f"r{i}", "url": u} for i, u in enumerate(urls)],
            "adapters": [{"name": n, "path": str(tmp_path / n)} for n in ADAPTERS],
            "admin": {"token": TOKEN},
            # Every instance's round robin starts at r0: without the shared finding, the
            # second instance's first adapter request would go to r0 and be refused.
            "routing": "round_robin",
            "poller": {"interval_s": 3600},  # polled by the test
            "state": {
                "backend": "redis",
                "redis_url": redis_url,
                "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
                "refresh_s": 0.05,
                "op_timeout_s": 0.5,
                "maintenance_interval_s": 0.02,
            },
        }
    )


async def _retries(gw: RunningGateway) -> float:
    """The instance's retries of adapter requests refused by r0 (``refused_load``)."""
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if (
            line.startswith("loragate_upstream_retries_total{")
            and 'replica="r0"' in line
            and 'reason="refused_load"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _lora_off(gw: RunningGateway) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/admin/replicas", headers=headers) as resp,
    ):
        body = await resp.json()
    return {r["id"]: r["lora_off"] for r in body["replicas"]}["r0"]


async def test_a_replica_found_without_lora_by_one_instance_costs_the_other_no_retry(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        first = contextlib.AsyncExitStack()  # the first r0 (no LoRA), stopped before the restart
        stack.push_async_callback(first.aclose)
        r0 = await first.enter_async_context(_twin(enable_lora=False))
        r1 = await stack.enter_async_context(_twin(enable_lora=True))
        cfg = _config(tmp_path, [r0.url, r1.url], redis_server.url)
        gw1 = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw2 = await stack.enter_async_context(running_gateway(cfg, port=0))
        c1 = await stack.enter_async_context(openai_client(gw1.url))
        c2 = await stack.enter_async_context(openai_client(gw2.url))
        pool1, pool2 = gw1.gateway.pool, gw2.gateway.pool

        # gw1 finds it out: one failed load, one retry.
        for name in ADAPTERS:
            done = await c1.completions.create(model=name, prompt="p", max_tokens=2)
            assert done.model == name
        assert "r0" in pool1.lora_off
        assert await _retries(gw1) == 1.0

        # gw2 holds it so from its next refresh, before any request of its own.
        await wait_until(lambda: "r0" in pool2.lora_off, "gw2 adopting the finding", WAIT_S)
        for _ in range(2):
            for name in ADAPTERS:
                done = await c2.completions.create(model=name, prompt="p", max_tokens=2)
                assert done.model == name
        assert await _retries(gw2) == 0.0  # before: 1.0 (its own failed load and retry)
        shown = await _lora_off(gw2)
        assert shown is not None and shown["cause"] == "lora_disabled"
        assert "LoRA is not enabled" in shown["answer"]
        base = await c2.completions.create(model="m", prompt="p", max_tokens=2)
        assert base.model == "m"  # base-model requests still go everywhere
        assert pool2.refusals.counts == {} and pool2.refused_adapters("r0") == {}

        # r0 restarted with LoRA at the same URL: gw1's check finds it back, for both.
        await first.aclose()
        await pool1.poll_once()  # refused: it went away
        await stack.enter_async_context(_twin(port=r0.port, enable_lora=True))
        await pool1.poll_once()
        await wait_until(lambda: "r0" not in pool1.lora_off, "gw1 letting r0 go", WAIT_S)
        await wait_until(lambda: "r0" not in pool2.lora_off, "gw2 letting r0 go", WAIT_S)
        assert await eventually(lambda: _lora_off(gw2), lambda off: off is None) is None
        for name in ADAPTERS:
            await c2.completions.create(model=name, prompt="p", max_tokens=2)
        assert pool2.adapter_loads()["r0"] > 0
