"""Config reload (``POST /admin/reload`` and SIGHUP) without dropping requests in flight."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client, serve_process

from loragate.gateway import load_config, running_gateway

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _write(path: Path, replicas: list[ScriptedReplica], **sections: Any) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
        "routing": "round_robin",
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def _reload(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.post(url + "/admin/reload", headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_reload_swaps_policy_adapters_and_replicas_while_a_stream_runs(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    first, second = replicas
    gate = asyncio.Event()
    first.stream_gate = gate  # r0 holds its streams after the first event
    path = _write(tmp_path / "gw.yaml", [first])
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        stream = await client.completions.create(model="lora-0", prompt="x", stream=True)
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices[0].text == " one"
        # New file: another policy, a second replica, the first one removed, a new adapter.
        _write(
            path,
            [second],
            routing={"policy": "consistent_hash", "load_factor": 1.5},
            adapters=[
                {"name": "lora-0", "path": "/loras/lora-0"},
                {"name": "lora-9", "path": "/loras/lora-9", "rank": 16},
            ],
            limits={"request_timeout_s": 30},
            poller={"interval_s": 1},
        )
        status, body = await _reload(http, gw.url)
        assert status == 200, body
        assert body["policy"] == "consistent_hash"
        assert (body["replicas_added"], body["replicas_removed"]) == (["r1"], ["r0"])
        assert body["restart_required"] == ["poller"]
        assert gw.gateway.config.poller.interval_s == 3600  # kept until a restart
        # The stream that started before the reload finishes, on the removed replica.
        gate.set()
        rest = [c.choices[0].text async for c in it]
        assert rest == [" two", " three"]
        # New requests follow the new config.
        for model in ("lora-9", "lora-0", BASE):
            raw = await client.completions.with_raw_response.create(
                model=model, prompt="x", max_tokens=2
            )
            assert raw.headers["x-loragate-replica"] == "r1"
        assert set(second.adapters) == {"lora-9", "lora-0"}
        async with http.get(gw.url + "/admin/replicas", headers=AUTH) as resp:
            listed = [r["id"] for r in (await resp.json())["replicas"]]
        assert listed == ["r1"]


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ("routing", "fastest", "routing"),
        ("routing", {"policy": "loragate", "weights": {"x": 1}}, "routing.weights"),
        (
            "routing",
            {
                "filters": ["registered"],
                "scorers": [{"name": "kv_cache", "weight": -1}],
                "picker": "max_score",
            },
            "routing.scorers[0].weight",
        ),
        ("limits", {"request_timeout_s": "long"}, "limits.request_timeout_s"),
        ("adapters", [{"name": "lora-0"}], "adapters[0].path"),
    ],
)
async def test_a_bad_file_is_rejected_and_the_old_config_stays(
    replicas: list[ScriptedReplica], tmp_path: Path, section: str, value: Any, key: str
) -> None:
    path = _write(tmp_path / "gw.yaml", replicas)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        _write(path, replicas, **{section: value})
        status, body = await _reload(http, gw.url)
        assert status == 400
        assert body["error"]["code"] == "invalid_config" and body["error"]["param"] == key
        assert key in body["error"]["message"]
        assert gw.gateway.policy.name == "round_robin"
        done = await client.completions.create(model="lora-0", prompt="x", max_tokens=2)
        assert done.model == "lora-0"
        path.write_text("base_model: [unclosed\n", encoding="utf-8")
        status, body = await _reload(http, gw.url)
        assert status == 400 and "not valid YAML" in body["error"]["message"]


async def test_reload_to_another_base_model_moves_traffic_to_the_replicas_serving_it(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    first, second = replicas
    second.base_model = "other-model"  # r1 serves another model: no traffic
    path = _write(tmp_path / "gw.yaml", replicas)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        assert [s.replica_id for s in gw.gateway.pool.healthy_snapshots()] == ["r0"]
        _write(path, replicas, base_model="other-model")
        status, body = await _reload(http, gw.url)
        assert status == 200, body
        await gw.gateway.pool.poll_once()
        assert [s.replica_id for s in gw.gateway.pool.healthy_snapshots()] == ["r1"]
        async with http.get(gw.url + "/admin/replicas", headers=AUTH) as resp:
            listed = {r["id"]: r for r in (await resp.json())["replicas"]}
        assert not listed["r0"]["healthy"]
        assert "not the gateway's base_model 'other-model'" in listed["r0"]["last_error"]
        assert first.requests == [] == second.requests


async def test_reload_without_a_config_file_is_a_400(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as h:
        status, body = await _reload(h, gw.url)
    assert status == 400 and "without a config file" in body["error"]["message"]


async def test_sighup_reloads_loragate_serve(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = _write(tmp_path / "gw.yaml", replicas[:1])
    async with serve_process(path) as serve:
        proc, url = serve.proc, serve.url
        _write(path, replicas[:1], routing="least_loaded")
        proc.send_signal(signal.SIGHUP)
        await serve.wait_for_log(r"config reloaded: policy least_loaded")
        _write(path, replicas[:1], routing="no-such-policy")
        proc.send_signal(signal.SIGHUP)
        await serve.wait_for_log(r"config reload rejected.*routing")
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/admin/replicas", headers=AUTH) as resp:
                assert (await resp.json())["policy"] == "least_loaded"
            async with http.post(
                url + "/v1/completions", json={"model": "lora-0", "prompt": "p"}
            ) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
