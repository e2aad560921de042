"""Real vLLM 0.32 behind the gateway: what the replicas say of their LoRA settings wins over
the config, and a replica without ``--enable-lora`` is found out once.

* The session's replica runs ``--max-loras 2`` while the gateway's config says
  ``settings.max_loras: 4``: once vLLM reports ``max_lora="2"`` (``vllm:lora_requests_info``,
  from its first request on) the gateway models 2 GPU slots (``/admin/replicas``,
  ``loragate_replica_adapter_slots``) and says so in one WARNING.
* A second replica runs without ``--enable-lora``: the first adapter request routed there gets
  vLLM's 500 "LoRA is not enabled" to its load and is retried on the other replica; from then on
  no adapter request goes there (no more retries), base-model requests still do. Its ``/metrics``
  after serving has generated tokens and no ``vllm:lora_requests_info`` (the hint the pool
  checks), the LoRA replica's has the gauge.

This test starts (and stops) a second vLLM server (~45 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import aiohttp
import pytest
from vllm_e2e import BASE, REAL_CONFIG

from loragate.backends.lora_off import looks_lora_off
from loragate.backends.metrics import parse_vllm_metrics
from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from vllm_cpu.replica import Replica, start_replica

pytestmark = pytest.mark.vllm

TOKEN = "admin-s3cret"
NO_LORA = dataclasses.replace(REAL_CONFIG, enable_lora=False, omp_bind="1")


async def _get(http: aiohttp.ClientSession, url: str, auth: bool = True) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json() if "/admin/" in url else await resp.text()


def _metric(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_reported_max_lora_and_a_replica_without_lora(
    real_vllm: Replica,
    vllm_work_dir: Any,
    lora_paths: dict[int, list[str]],
    unique_name: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.backends.pool")
    no_lora = await asyncio.to_thread(
        start_replica, NO_LORA, work_dir=vllm_work_dir, log_name="e2e-no-lora.log"
    )
    try:
        names = [f"{unique_name}-{i}" for i in range(4)]
        paths = lora_paths[8] + lora_paths[16]
        cfg = config_from_mapping(
            {
                "base_model": BASE,
                "replicas": [
                    {
                        "id": "v1",
                        "url": real_vllm.base_url,
                        "settings": {"max_loras": 4, "max_cpu_loras": 4},
                    },
                    {"id": "v2", "url": no_lora.base_url},
                ],
                "adapters": [{"name": n, "path": p} for n, p in zip(names, paths, strict=False)],
                "admin": {"token": TOKEN},
                "routing": "round_robin",
                "poller": {"interval_s": 3600},  # polled by the test
            }
        )
        async with contextlib.AsyncExitStack() as stack:
            gw = await stack.enter_async_context(running_gateway(cfg, port=0))
            pool = gw.gateway.pool
            url = gw.url + "/v1/completions"
            for _ in range(2):
                for name in names:
                    body = {"model": name, "prompt": "hi", "max_tokens": 2}
                    async with http.post(url, json=body) as resp:
                        assert resp.status == 200, await resp.text()
            for _ in range(4):  # base-model requests: both replicas
                body = {"model": BASE, "prompt": "hi", "max_tokens": 2}
                async with http.post(url, json=body) as resp:
                    assert resp.status == 200, await resp.text()
            await pool.poll_once()
            metrics = await _get(http, gw.url + "/metrics", auth=False)
            # One failed load there (the first adapter request routed there), then none.
            assert _metric(metrics, "loragate_upstream_retries_total", replica="v2") == 1.0
            for name in names:  # every adapter request answered by v1
                assert _metric(metrics, "loragate_requests_total", adapter=name,
                               replica="v2") == 0.0  # fmt: skip
                assert _metric(metrics, "loragate_requests_total", adapter=name,
                               replica="v1") == 2.0  # fmt: skip
            assert _metric(metrics, "loragate_replica_lora_off", replica="v2",
                           cause="lora_disabled") == 1.0  # fmt: skip
            assert _metric(metrics, "loragate_replica_adapter_slots", replica="v1",
                           tier="gpu") == 2.0  # fmt: skip
            reps = {r["id"]: r for r in (await _get(http, gw.url + "/admin/replicas"))["replicas"]}
            assert reps["v1"]["settings"]["max_loras"] == 2
            assert reps["v1"]["settings_configured"]["max_loras"] == 4
            assert reps["v1"]["settings_reported"] == {"max_loras": 2}
            assert len(reps["v1"]["residency"]["gpu"]) <= 2
            assert reps["v2"]["healthy"] is True
            assert reps["v2"]["lora_off"]["cause"] == "lora_disabled"
            assert "LoRA is not enabled" in reps["v2"]["lora_off"]["answer"]
            assert pool.refusals.counts == {}
            warnings = [
                r.getMessage()
                for r in caplog.records
                if r.name == "loragate.backends.pool" and r.levelno == logging.WARNING
            ]
            assert sum("serves no adapters" in w for w in warnings) == 1, warnings
            assert sum("max_lora 2" in w for w in warnings) == 1, warnings
        # The hint the pool checks: generated tokens without the LoRA gauge, on real vLLM.
        off = parse_vllm_metrics(await _get(http, no_lora.base_url + "/metrics", auth=False))
        on = parse_vllm_metrics(await _get(http, real_vllm.base_url + "/metrics", auth=False))
        assert off.generation_tokens > 0 and looks_lora_off(off)
        assert on.max_loras == 2 and not looks_lora_off(on)
    finally:
        await asyncio.to_thread(no_lora.stop)
