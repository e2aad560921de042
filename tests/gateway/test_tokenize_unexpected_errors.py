"""An unexpected failure in the forwarded tokenizer endpoints (``gateway.tokenize``) is answered
as the completions' are: the OpenAI-shape 500 with the ``X-Request-Id`` its log lines say. The
real case: ``GET /version``'s first replica drops the connection after a config reload removed
the replica of the second try (``pool.client`` raises ``KeyError``). Before, that escaped to
aiohttp, whose 500 (``gateway.protocol_errors``) carried a freshly generated id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from gateway_harness import BASE, ScriptedReplica, serving_replicas

from loragate.gateway import load_config, running_gateway

TOKEN = "t"


class VersionReplica(ScriptedReplica):
    """A scripted replica with ``GET /version``; with ``gate``, it waits for it, then drops
    the connection without answering."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.asked = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.app.router.add_get("/version", self._version)

    async def _version(self, request: web.Request) -> web.Response:
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        return web.json_response({"version": "0.32.0"})


def _write(path: Path, replicas: list[VersionReplica]) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "poller": {"interval_s": 3600, "timeout_s": 30},  # /version's timeout: never reached
        "admin": {"token": TOKEN},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def test_a_version_whose_second_replica_a_reload_removed_answers_with_its_logged_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        reps = await stack.enter_async_context(serving_replicas(VersionReplica))
        first = reps[0]
        first.gate = asyncio.Event()
        path = _write(tmp_path / "gw.yaml", reps)
        gw = await stack.enter_async_context(
            running_gateway(load_config(path), port=0, config_path=path)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        caplog.set_level(logging.WARNING, logger="loragate.gateway.tokenize")
        asked = asyncio.create_task(http.get(gw.url + "/version"))  # the first one: r0 first
        await asyncio.wait_for(first.asked.wait(), timeout=10)
        _write(path, [first])
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(gw.url + "/admin/reload", headers=auth) as resp:
            reloaded = resp.status, await resp.json()
        assert reloaded[0] == 200 and reloaded[1]["replicas_removed"] == ["r1"], reloaded
        first.gate.set()  # r0 drops it: the second try is r1's, gone
        async with await asyncio.wait_for(asked, timeout=10) as resp:
            status, body, request_id = resp.status, await resp.json(), resp.headers["X-Request-Id"]
        async with http.get(gw.url + "/livez") as resp:
            alive = resp.status
    assert status == 500, body
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    logged = [r.getMessage() for r in caplog.records if r.name == "loragate.gateway.tokenize"]
    failed = [m for m in logged if "(/version) on replica r0" in m]
    assert len(failed) == 1, logged
    said = re.match(r"request (\S+) ", failed[0])
    assert said is not None and said.group(1) == request_id  # the id the client got
    assert any(m.startswith(f"request {request_id}: unexpected error") for m in logged), logged
    assert alive == 200
