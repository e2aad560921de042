"""A request still running on a replica's entry that a config reload replaced (its key or
settings changed) fails there: the failure is the old entry's, and must not take the new entry
out of rotation (the pool cannot tell them apart by replica id). Scripted replicas and the
gateway on loopback, the openai SDK as client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, openai_client
from prometheus_client.parser import text_string_to_metric_families

from loragate.gateway import load_config, running_gateway

TOKEN = "replaced-entries-token"
HEALTHY = "loragate_replica_healthy"


def _write(path: Path, rep: ScriptedReplica, **entry: Any) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": rep.name, "url": rep.url, **entry}],
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
        "poller": {"interval_s": 3600},  # polls happen when a reload says
        "admin": {"token": TOKEN},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def _metric(url: str, name: str, **labels: str) -> float | None:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def _reload(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


@pytest.mark.parametrize("change", ["settings", "api_key"])
async def test_a_stream_breaking_on_a_replaced_entry_leaves_the_new_one_in_rotation(
    replicas: list[ScriptedReplica], tmp_path: Path, change: str
) -> None:
    rep = replicas[0]
    gate = asyncio.Event()
    rep.stream_gate = gate  # holds the stream after its first event ...
    rep.mode = "die_mid_stream"  # ... then drops the connection after the second
    path = _write(tmp_path / "gw.yaml", rep)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
    ):
        stream = await client.completions.create(model="lora-0", prompt="hold", stream=True)
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices[0].text == " one"
        new_entry = {"settings": {"max_loras": 2}} if change == "settings" else {"api_key": "k2"}
        _write(path, rep, **new_entry)
        assert (await _reload(gw.url))["replicas_changed"] == ["r0"]
        assert await _metric(gw.url, HEALTHY, replica="r0") == 1  # the new entry polled

        gate.set()  # the old entry's connection breaks off now
        with pytest.raises(openai.APIError, match="broke off the stream"):
            async for _ in it:
                pass
        rep.mode, rep.stream_gate = "ok", None
        assert (
            await _metric(
                gw.url, "loragate_requests_total", adapter="lora-0", replica="r0",
                status="stream_error",
            )
        ) == 1  # fmt: skip
        # The new entry was not the one that failed: it stays in rotation, and serves.
        assert await _metric(gw.url, HEALTHY, replica="r0") == 1
        assert gw.gateway.pool.last_error("r0") is None
        done = await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r0"


async def test_a_stream_breaking_on_the_current_entry_still_takes_it_out(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    """The same break without a reload: the replica is out until its next poll (so the test
    above can tell the two apart)."""
    rep = replicas[0]
    rep.mode = "die_mid_stream"
    path = _write(tmp_path / "gw.yaml", rep)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
    ):
        stream = await client.completions.create(model="lora-0", prompt="p", stream=True)
        with pytest.raises(openai.APIError, match="broke off the stream"):
            async for _ in stream:
                pass
        assert await _metric(gw.url, HEALTHY, replica="r0") == 0
        assert "streaming" in (gw.gateway.pool.last_error("r0") or "")
