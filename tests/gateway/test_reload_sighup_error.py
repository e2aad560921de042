"""A SIGHUP reload of ``loragate serve`` that fails other than on a bad file (``load_config``
accepts it, applying it fails) is logged with its file and traceback and counted as an error;
nothing of it is applied, and the gateway serves on. The trigger: a replica ``api_key`` with a
character an HTTP header cannot carry (not Latin-1), which config validation lets through and
the replica's connection pool cannot build a header from."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from gateway_harness import BASE, ScriptedReplica, serve_process
from prometheus_client.parser import text_string_to_metric_families

from loragate.gateway import load_config


def _write(path: Path, replicas: list[dict[str, Any]]) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": replicas,
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
        "poller": {"interval_s": 3600},
    }
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


async def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _complete(http: aiohttp.ClientSession, url: str) -> str:
    body = {"model": "lora-0", "prompt": "p", "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-loragate-replica"]


async def test_a_sighup_reload_that_fails_to_apply_is_logged_and_changes_nothing(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    r0, r1 = ({"id": r.name, "url": r.url} for r in replicas)
    path = _write(tmp_path / "gw.yaml", [r0])
    bad = [{**r0, "api_key": "ключ"}, r1]  # r0's key changes (replaced), r1 added
    _write(tmp_path / "check.yaml", bad)
    assert load_config(tmp_path / "check.yaml").replicas[0].api_key == "ключ"  # accepted
    async with serve_process(path) as serve, aiohttp.ClientSession() as http:
        assert await _complete(http, serve.url) == "r0"
        _write(path, bad)
        serve.proc.send_signal(signal.SIGHUP)
        line = await serve.wait_for_log(r"config reload \(SIGHUP\) of (\S+) failed, serving on")
        assert line.group(1) == str(path)
        await serve.wait_for_log(r"UnicodeEncodeError")  # the traceback follows
        seen = await _metrics(serve.url)
        assert seen[("loragate_config_reloads_total", (("result", "error"),))] == 1
        assert seen[("loragate_config_reloads_total", (("result", "ok"),))] == 0
        # Nothing applied: r1 was not added, r0 keeps its entry and serves.
        assert ("loragate_replica_healthy", (("replica", "r1"),)) not in seen
        assert seen[("loragate_replica_healthy", (("replica", "r0"),))] == 1
        for _ in range(3):
            assert await _complete(http, serve.url) == "r0"
        assert replicas[1].requests == []

        # The file fixed: the next SIGHUP applies it.
        _write(path, [r0, r1])
        serve.proc.send_signal(signal.SIGHUP)
        await serve.wait_for_log(r"config reloaded: .* \+\['r1'\]")
        seen = await _metrics(serve.url)
        assert seen[("loragate_replica_healthy", (("replica", "r1"),))] == 1
        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0
