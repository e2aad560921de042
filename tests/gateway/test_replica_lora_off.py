"""A replica that serves no adapters is found out once, not one adapter at a time.

vLLM 0.32 without ``--enable-lora`` answers every adapter load with a 500 "LoRA is not
enabled"; without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` its load route is a 404
``{"detail":"Not Found"}`` (``bench/vllm_cpu/lora_off_transcript.md``; the simulated replica
answers the same). Such an answer marks the whole replica: no adapter request goes there (base
model requests do), one WARNING names the cause, ``/admin/replicas`` (``lora_off``,
``last_error``) and ``loragate_replica_lora_off`` show it, no refusal per adapter is recorded,
and the replica is checked again later (a replica restarted with LoRA comes back). A replica
whose ``/metrics`` shows generated tokens without ``vllm:lora_requests_info`` is checked before
any client request pays for it. Over loopback with simulated vLLM 0.32 replicas and the openai
SDK."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import openai_client, wait_until

from loragate.core.config import config_from_mapping
from loragate.gateway import RunningGateway, running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

TOKEN = "admin-s3cret"
ADAPTERS = [f"a{i}" for i in range(6)]


def _twin(port: int = 0, **kw: Any) -> Any:
    cfg = ReplicaConfig(served_model_name="m", max_loras=2, time_scale=50.0, **kw)
    return run_replica(cfg, port=port)


async def _get(url: str, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        assert resp.status == 200
        return await resp.json() if path.startswith("/admin") else await resp.text()


async def _replicas(gw: RunningGateway) -> dict[str, Any]:
    return {r["id"]: r for r in (await _get(gw.url, "/admin/replicas"))["replicas"]}


def _metric(metrics: str, name: str, **labels: str) -> float:
    """The sample of ``name`` with these labels (in any order; others allowed), 0 if none."""
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.asynccontextmanager
async def _gateway(
    tmp_path: Path, r0: RunningReplica, r1: RunningReplica, **poller: Any
) -> AsyncIterator[RunningGateway]:
    for name in ADAPTERS:
        write_adapter_folder(str(tmp_path / name), rank=8)
    cfg = config_from_mapping(
        {
            "base_model": "m",
            "replicas": [{"id": "r0", "url": r0.url}, {"id": "r1", "url": r1.url}],
            "adapters": [{"name": n, "path": str(tmp_path / n)} for n in ADAPTERS],
            "admin": {"token": TOKEN},
            "routing": "round_robin",
            "poller": {"interval_s": 3600, **poller},  # polled by the test
        }
    )
    async with running_gateway(cfg, port=0) as gw:
        yield gw


def _pool_warnings(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "loragate.backends.pool"
        and r.levelno >= logging.WARNING
        and word in r.getMessage()
    ]


async def test_a_replica_without_enable_lora_gets_no_adapter_requests_after_one_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.backends.pool")
    async with (
        _twin(enable_lora=False) as r0,
        _twin(enable_lora=True) as r1,
        _gateway(tmp_path, r0, r1) as gw,
        openai_client(gw.url) as client,
    ):
        for _ in range(3):
            for name in ADAPTERS:  # round robin: half of them routed to r0 first
                done = await client.completions.create(model=name, prompt="p", max_tokens=2)
                assert done.model == name
            await gw.gateway.pool.poll_once()
        base = [await client.completions.create(model="m", prompt="p", max_tokens=2)]
        base.append(await client.completions.create(model="m", prompt="p", max_tokens=2))
        assert all(b.model == "m" for b in base)
        metrics = await _get(gw.url, "/metrics")
        # One failed load and retry (the first request sent there), not one per adapter.
        retried = _metric(metrics, "loragate_upstream_retries_total", replica="r0",
                          reason="refused_load")  # fmt: skip
        assert retried == 1.0
        assert _metric(metrics, "loragate_replica_lora_off", replica="r0",
                       cause="lora_disabled") == 1.0  # fmt: skip
        assert _metric(metrics, "loragate_replica_lora_off", replica="r1",
                       cause="lora_disabled") == 0.0  # fmt: skip
        # Base-model requests still go there.
        assert r0.state.counters.prompt_tokens_total > 0
        # No refusal per adapter: the replica is marked instead.
        assert gw.gateway.pool.refusals.counts == {}
        reps = await _replicas(gw)
        assert reps["r0"]["healthy"] is True
        assert reps["r0"]["lora_off"]["cause"] == "lora_disabled"
        assert "LoRA is not enabled" in reps["r0"]["lora_off"]["answer"]
        assert "--enable-lora" in reps["r0"]["last_error"]
        assert reps["r0"]["refused_adapters"] == {}
        assert reps["r1"]["lora_off"] is None and reps["r1"]["last_error"] is None
        warnings = _pool_warnings(caplog, "serves no adapters")
        assert len(warnings) == 1, warnings
        assert "r0" in warnings[0] and "--enable-lora" in warnings[0]


async def test_a_replica_without_runtime_loading_is_named_with_the_env_var(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.backends.pool")
    async with (
        _twin(enable_lora=True, runtime_lora_updating=False) as r0,
        _twin(enable_lora=True) as r1,
        _gateway(tmp_path, r0, r1) as gw,
        openai_client(gw.url) as client,
    ):
        for name in ADAPTERS * 2:
            done = await client.completions.create(model=name, prompt="p", max_tokens=2)
            assert done.model == name
        metrics = await _get(gw.url, "/metrics")
        retried = _metric(metrics, "loragate_upstream_retries_total", replica="r0",
                          reason="refused_load")  # fmt: skip
        assert retried == 1.0
        assert _metric(metrics, "loragate_replica_lora_off", replica="r0",
                       cause="no_runtime_loading") == 1.0  # fmt: skip
        reps = await _replicas(gw)
        assert reps["r0"]["lora_off"]["cause"] == "no_runtime_loading"
        assert reps["r0"]["lora_off"]["answer"].endswith('{"detail":"Not Found"}')
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in reps["r0"]["last_error"]
        warnings = _pool_warnings(caplog, "serves no adapters")
        assert len(warnings) == 1, warnings
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in warnings[0]


async def test_a_replica_restarted_with_lora_comes_back_and_a_recheck_says_nothing_new(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loragate.backends.pool")
    async with contextlib.AsyncExitStack() as stack:
        first = contextlib.AsyncExitStack()  # the first r0, stopped before the restart
        r0 = await first.enter_async_context(_twin(enable_lora=False))
        stack.push_async_callback(first.aclose)
        r1 = await stack.enter_async_context(_twin(enable_lora=True))
        # adapter_refusal_ttl_s 0: a replica serving no adapters is checked at every poll.
        gw = await stack.enter_async_context(_gateway(tmp_path, r0, r1, adapter_refusal_ttl_s=0))
        pool = gw.gateway.pool
        client = await stack.enter_async_context(openai_client(gw.url))
        for name in ADAPTERS[:2]:
            await client.completions.create(model=name, prompt="p", max_tokens=2)
        assert "r0" in pool.lora_off
        # Re-checked at each later poll: still off, said once, no client pays.
        for _ in range(3):
            await pool.poll_once()
            await wait_until(lambda: not pool.lora_checking("r0"), "the check's end")
            assert "r0" in pool.lora_off
        assert len(_pool_warnings(caplog, "serves no adapters")) == 1
        retried = _metric(await _get(gw.url, "/metrics"), "loragate_upstream_retries_total",
                          replica="r0", reason="refused_load")  # fmt: skip
        assert retried == 1.0
        # Restarted with --enable-lora at the same URL: back once a poll answered after it left.
        await first.aclose()
        await pool.poll_once()  # refused: it went away
        await stack.enter_async_context(_twin(port=r0.port, enable_lora=True))
        await pool.poll_once()
        await wait_until(lambda: "r0" not in pool.lora_off, "r0 serving adapters again")
        reps = await _replicas(gw)
        assert reps["r0"]["lora_off"] is None and reps["r0"]["last_error"] is None
        for name in ADAPTERS:
            await client.completions.create(model=name, prompt="p", max_tokens=2)
        assert pool.adapter_loads()["r0"] > 0


async def test_metrics_without_the_lora_gauge_get_the_replica_checked_before_any_request(
    tmp_path: Path,
) -> None:
    async with (
        _twin(enable_lora=False) as r0,
        _twin(enable_lora=True) as r1,
        _gateway(tmp_path, r0, r1) as gw,
        openai_client(gw.url) as client,
    ):
        pool = gw.gateway.pool
        for _ in range(2):  # one to each replica: r0 generates tokens
            await client.completions.create(model="m", prompt="p", max_tokens=2)
        await pool.poll_once()
        await wait_until(lambda: "r0" in pool.lora_off, "r0 checked and marked")
        assert "r1" not in pool.lora_off
        for name in ADAPTERS * 2:
            done = await client.completions.create(model=name, prompt="p", max_tokens=2)
            assert done.model == name
        metrics = await _get(gw.url, "/metrics")
        assert "loragate_upstream_retries_total{" not in metrics  # no client paid a retry
        await pool.poll_once()  # a LoRA replica's gauge says it is on: not checked
        assert not pool.lora_checking("r1") and "r1" not in pool.lora_off


async def test_with_no_replica_serving_adapters_the_502_names_the_cause_without_a_load(
    tmp_path: Path,
) -> None:
    async with (
        _twin(enable_lora=False) as r0,
        _twin(enable_lora=False) as r1,
        _gateway(tmp_path, r0, r1) as gw,
        openai_client(gw.url) as client,
    ):
        messages = []
        for name in ADAPTERS[:3]:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.completions.create(model=name, prompt="p", max_tokens=2)
            assert caught.value.status_code == 502
            assert isinstance(caught.value.body, dict)
            messages.append(caught.value.body["message"])
        # The first found both replicas out (its try and its retry), the others no replica.
        assert "serves no adapters" in messages[0] and "LoRA is not enabled" in messages[0]
        for later in messages[1:]:
            assert later.startswith("no healthy replica serves adapter")
            assert "replica r0 serves no adapters" in later
            assert "replica r1 serves no adapters" in later
        metrics = await _get(gw.url, "/metrics")
        assert _metric(metrics, "loragate_upstream_retries_total") == 1.0
        done = await client.completions.create(model="m", prompt="p", max_tokens=2)
        assert done.model == "m"  # the base model is served
