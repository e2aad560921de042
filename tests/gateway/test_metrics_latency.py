"""Latency as the client saw it, in ``/metrics`` scraped over loopback and parsed with
prometheus_client's own parser: TTFT by where routing found the adapter
(``loragate_ttft_by_residency_seconds{residency}``), so that a TTFT tail of adapters already in
a GPU slot tells a busy host from adapter loads; and the whole duration of answers that are not
streams, from arrival to the whole answer (``loragate_request_duration_seconds{status_class,
residency}``), adapter load waits and retries included, which the per-attempt upstream latency
leaves out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving,
)
from metric_counts import Samples, scrape

from loragate.core.config import GatewayConfig
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

TTFT = "loragate_ttft_by_residency_seconds"
DURATION = "loragate_request_duration_seconds"


def _by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """``name``'s samples by the values of ``labels`` (in that order)."""
    out = {}
    for (got, pairs), value in samples.items():
        d = dict(pairs)
        if got == name and set(d) == set(labels):
            out[tuple(d[k] for k in labels)] = value
    return out


@contextlib.asynccontextmanager
async def _twin() -> AsyncIterator[RunningReplica]:
    """A simulated vLLM 0.32 replica with one GPU slot and a CPU cache of two."""
    cfg = ReplicaConfig(
        served_model_name=BASE, enable_lora=True, max_loras=1, max_cpu_loras=2,
        max_lora_rank=16, time_scale=50.0,
    )  # fmt: skip
    async with run_replica(cfg, port=0) as replica:
        yield replica


def _config(replica: RunningReplica, tmp: Path, n: int = 2) -> GatewayConfig:
    adapters = []
    for i in range(n):
        write_adapter_folder(str(tmp / f"lora-{i}"), rank=8)
        adapters.append({"name": f"lora-{i}", "path": str(tmp / f"lora-{i}"), "rank": 8})
    return gateway_config(
        [replica.url],
        replicas=[
            {"id": "r0", "url": replica.url, "settings": {"max_loras": 1, "max_cpu_loras": 2}}
        ],
        adapters=adapters,
    )


async def test_ttft_and_whole_answers_by_residency(tmp_path: Path) -> None:
    async with (
        _twin() as replica,
        running_gateway(_config(replica, tmp_path), port=0) as gw,
        openai_client(gw.url) as client,
    ):
        before = await scrape(gw.url)
        # One GPU slot, a CPU cache of two. Where each adapter is at its request:
        #   stream lora-0      unregistered (load) -> gpu [0]  cpu [0]
        #   stream lora-0      gpu
        #   stream base model  base
        #   lora-1             unregistered (load) -> gpu [1]  cpu [0, 1]
        #   lora-0             cpu                 -> gpu [0]  cpu [1, 0]
        #   lora-1             cpu                 -> gpu [1]  cpu [0, 1]
        #   unknown model      none: refused (404) before routing
        for model in ("lora-0", "lora-0", BASE):
            events = await client.completions.create(
                model=model, prompt="p", max_tokens=2, stream=True
            )
            assert [e async for e in events]
        for model in ("lora-1", "lora-0", "lora-1"):
            done = await client.completions.create(model=model, prompt="p", max_tokens=2)
            assert done.model == model
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="no-such-lora", prompt="p", max_tokens=2)
        after = await scrape(gw.url)
    # TTFT by residency: every residency shown from 0 (increase() sees the first of each).
    assert _by(before, TTFT + "_count", "residency") == {
        ("gpu",): 0, ("cpu",): 0, ("registered",): 0, ("unregistered",): 0, ("base",): 0,
    }  # fmt: skip
    assert _by(after, TTFT + "_count", "residency") == {
        ("gpu",): 1, ("cpu",): 0, ("registered",): 0, ("unregistered",): 1, ("base",): 1,
    }  # fmt: skip
    assert _by(after, TTFT + "_bucket", "residency", "le")[("unregistered", "+Inf")] == 1
    # Its sum per residency adds up to the per-replica TTFT's (the same observations).
    by_residency = sum(_by(after, TTFT + "_sum", "residency").values())
    assert by_residency == pytest.approx(
        _by(after, "loragate_ttft_seconds_sum", "replica")[("r0",)]
    )
    # Whole answers (the streams are not in it), by status class and residency.
    assert _by(after, DURATION + "_count", "status_class", "residency") == {
        ("2xx", "unregistered"): 1, ("2xx", "cpu"): 2, ("4xx", "none"): 1,
    }  # fmt: skip
    assert (
        _by(after, DURATION + "_bucket", "status_class", "residency", "le")[("2xx", "cpu", "+Inf")]
        == 2
    )


async def test_a_whole_answers_duration_holds_its_load_wait_and_its_upstream_time(
    tmp_path: Path,
) -> None:
    """The client's wait is the adapter load and the replica's answer, and more (routing,
    reading the body): loragate_upstream_latency_seconds alone leaves the load out."""
    async with (
        _twin() as replica,
        running_gateway(_config(replica, tmp_path, 1), port=0) as gw,
        openai_client(gw.url) as client,
    ):
        await client.completions.create(model="lora-0", prompt="p", max_tokens=2)
        after = await scrape(gw.url)
    [duration] = _by(after, DURATION + "_sum", "status_class", "residency").items()
    assert duration[0] == ("2xx", "unregistered")
    load_wait = _by(after, "loragate_adapter_load_wait_seconds_sum", "replica")[("r0",)]
    upstream = _by(after, "loragate_upstream_latency_seconds_sum", "replica")[("r0",)]
    assert load_wait > 0
    assert duration[1] >= load_wait + upstream


async def test_a_client_that_gave_up_waiting_is_in_the_duration() -> None:
    """A non-streaming request whose client left while the replica held its answer: no
    upstream latency (no answer came), but the client's wait is a client_closed duration."""
    replica = ScriptedReplica("r0")
    replica.answer_gate = gate = asyncio.Event()
    seen: Samples = {}
    async with (
        serving(replica.app) as (url, _),
        running_gateway(gateway_config([url]), port=0) as gw,
    ):
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=0.5
        ) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        for _ in range(200):  # until the gateway has seen the client leave (bounded)
            seen = await scrape(gw.url)
            if _by(seen, DURATION + "_count", "status_class", "residency"):
                break
            await asyncio.sleep(0.05)
        gate.set()
    assert _by(seen, DURATION + "_count", "status_class", "residency") == {
        ("client_closed", "base"): 1
    }
    assert not _by(seen, "loragate_upstream_latency_seconds_count", "replica")
