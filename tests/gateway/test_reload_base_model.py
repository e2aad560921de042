"""A config reload that changes ``base_model`` to a model no replica serves is rejected, naming
the key, with the running config kept (``gateway.reload.check_base_model``): before, it
answered ``reloaded`` with ``restart_required: []`` and the next poll took every replica out of
rotation (``/health`` unavailable). Both ways of asking: ``POST /admin/reload`` and SIGHUP.
Scripted vLLM replicas on loopback; ``test_config_reload`` has the reload that moves traffic
to the replicas serving the new model (still applied)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from gateway_harness import (
    BASE,
    ScriptedReplica,
    openai_client,
    serve_process,
    serving_replicas,
)

from loragate.gateway import load_config, running_gateway

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class CountingReplica(ScriptedReplica):
    """Counts the ``GET /v1/models`` it answers (the gateway's polls)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.polls = 0

    async def _models(self, request: web.Request) -> web.Response:
        self.polls += 1
        return await super()._models(request)


@contextlib.asynccontextmanager
async def _replicas() -> AsyncIterator[list[CountingReplica]]:
    async with serving_replicas(CountingReplica) as out:
        yield out


def _write(path: Path, replicas: list[CountingReplica], **sections: Any) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
        "routing": "round_robin",
        "poller": {"interval_s": 0.05},
        "admin": {"token": TOKEN},
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_posting_a_reload_to_a_model_no_replica_serves_is_a_400_and_keeps_the_fleet(
    tmp_path: Path,
) -> None:
    async with _replicas() as replicas:
        path = _write(tmp_path / "gw.yaml", replicas)
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            aiohttp.ClientSession() as http,
            openai_client(gw.url) as client,
        ):
            _write(path, replicas, base_model="other-model", routing="least_loaded")
            async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
                status, body = resp.status, await resp.json()
            assert status == 400, body
            error = body["error"]
            assert error["param"] == "base_model" and error["code"] == "invalid_config"
            assert "no replica serves 'other-model'" in error["message"]
            assert f"r0: {BASE}" in error["message"] and f"r1: {BASE}" in error["message"]
            assert "running config stays in force" in error["message"]
            await gw.gateway.pool.poll_once()  # a poll after the reload
            assert len(gw.gateway.pool.healthy_snapshots()) == 2
            assert gw.gateway.config.base_model == BASE
            assert gw.gateway.policy.name == "round_robin"  # nothing of the file applied
            status, health = await _get(http, gw.url + "/health")
            assert (status, health["status"], health["replicas_healthy"]) == (200, "ok", 2)
            done = await client.completions.create(model="lora-0", prompt="x", max_tokens=2)
            assert done.choices


async def test_a_sighup_reload_to_a_model_no_replica_serves_is_rejected_and_keeps_the_fleet(
    tmp_path: Path,
) -> None:
    async with _replicas() as replicas:
        path = _write(tmp_path / "gw.yaml", replicas)
        async with serve_process(path) as serve, aiohttp.ClientSession() as http:
            _write(path, replicas, base_model="other-model")
            serve.proc.send_signal(signal.SIGHUP)
            line = await serve.wait_for_log(r"config reload rejected.*(base_model: .*)")
            assert "no replica serves 'other-model'" in line.group(1)
            # Two polls of each replica after the rejection (bounded wait), then the verdict.
            after = [r.polls for r in replicas]
            for _ in range(200):
                if all(r.polls >= n + 2 for r, n in zip(replicas, after, strict=True)):
                    break
                await asyncio.sleep(0.05)
            status, health = await _get(http, serve.url + "/health")
            assert (status, health["status"], health["replicas_healthy"]) == (200, "ok", 2)
            async with http.post(
                serve.url + "/v1/completions", json={"model": "lora-0", "prompt": "p"}
            ) as resp:
                assert resp.status == 200
            serve.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0
