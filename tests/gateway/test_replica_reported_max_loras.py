"""A replica whose config's ``settings.max_loras`` differs from what its vLLM runs
(``--max-loras``): vLLM's reported ``max_lora`` (``vllm:lora_requests_info``) is the truth for
the running server. The shadow residency, routing and ``loragate_replica_adapter_slots`` use it,
one WARNING names both values (once, not per poll), and ``/admin/replicas`` shows the settings
in use, the configured ones and the reported value. Before the server ran a request vLLM
reports nothing (measured on vLLM 0.32: ``bench/vllm_cpu/lora_off_transcript.md``): the
config's value stands. Over loopback with a simulated vLLM 0.32 replica and the openai SDK."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import openai_client

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

TOKEN = "admin-s3cret"
ADAPTERS = [f"a{i}" for i in range(5)]


async def _get(url: str, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        assert resp.status == 200
        return await resp.json() if path.startswith("/admin") else await resp.text()


def _gpu_slots(metrics: str) -> float:
    found = re.search(r'loragate_replica_adapter_slots\{replica="r0",tier="gpu"\} (\S+)', metrics)
    assert found is not None, metrics
    return float(found.group(1))


async def test_the_reported_max_lora_is_what_the_residency_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ADAPTERS:
        write_adapter_folder(str(tmp_path / name), rank=8)
    caplog.set_level(logging.INFO, logger="loragate.backends.pool")
    async with contextlib.AsyncExitStack() as stack:
        twin = ReplicaConfig(served_model_name="m", enable_lora=True, max_loras=2, time_scale=50.0)
        replica = await stack.enter_async_context(run_replica(twin, port=0))
        gw_cfg = config_from_mapping(
            {
                "base_model": "m",
                "replicas": [
                    {
                        "id": "r0",
                        "url": replica.url,
                        "settings": {"max_loras": 4, "max_cpu_loras": 8},
                    }
                ],
                "adapters": [{"name": n, "path": str(tmp_path / n)} for n in ADAPTERS],
                "admin": {"token": TOKEN},
                "poller": {"interval_s": 3600},  # polled by the test
            }
        )
        gw = await stack.enter_async_context(running_gateway(gw_cfg, port=0))
        pool = gw.gateway.pool
        client = await stack.enter_async_context(openai_client(gw.url))

        # Not reported yet (the server ran nothing): the config's 4 stands, quietly.
        (rep,) = (await _get(gw.url, "/admin/replicas"))["replicas"]
        assert rep["settings"]["max_loras"] == 4
        assert rep["settings_configured"]["max_loras"] == 4
        assert rep["settings_reported"] == {"max_loras": None}
        assert _gpu_slots(await _get(gw.url, "/metrics")) == 4.0

        # Four adapters routed there before the poll that reads vLLM's max_lora: modelled in
        # 4 GPU slots, then cut to the 2 it runs when the poll tells (not at the next request).
        for name in ADAPTERS[:4]:
            await client.completions.create(model=name, prompt="p", max_tokens=2)
        (rep,) = (await _get(gw.url, "/admin/replicas"))["replicas"]
        assert rep["residency"]["gpu"] == ADAPTERS[:4]
        for _ in range(3):  # one WARNING, not one per poll
            await pool.poll_once()
        (rep,) = (await _get(gw.url, "/admin/replicas"))["replicas"]
        assert rep["settings"]["max_loras"] == 2  # before: 4
        assert rep["settings"]["max_cpu_loras"] == 8  # the config's, at least max_loras
        assert rep["settings_configured"]["max_loras"] == 4
        assert rep["settings_reported"] == {"max_loras": 2}
        assert _gpu_slots(await _get(gw.url, "/metrics")) == 2.0
        assert rep["residency"]["gpu"] == ADAPTERS[2:4]
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "max_lora" in r.getMessage()
        ]
        assert len(warnings) == 1, warnings
        assert "settings.max_loras 4" in warnings[0] and "max_lora 2" in warnings[0]

        # Five adapters in turn: the shadow residency holds 2 of them in GPU slots, not 4.
        for name in ADAPTERS:
            await client.completions.create(model=name, prompt="p", max_tokens=2)
        (rep,) = (await _get(gw.url, "/admin/replicas"))["replicas"]
        assert rep["residency"]["gpu"] == ADAPTERS[-2:]
        assert len(rep["residency"]["cpu"]) == 5
