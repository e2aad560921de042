"""A reload that lists one vLLM server under a second name (``localhost`` beside
``127.0.0.1``) is warned about as a start-up is (before, only the start-up's replicas were
checked: a reload that introduced such a pair logged nothing)."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica
from log_lines import same_server_warnings

from loragate.gateway import load_config, running_gateway


def _write(path: Path, urls: list[str]) -> None:
    replicas = "".join(f"  - {{id: r{i}, url: '{u}'}}\n" for i, u in enumerate(urls))
    path.write_text(
        f"base_model: {BASE}\nreplicas:\n{replicas}admin: {{token: t}}\n", encoding="utf-8"
    )


async def test_a_reload_that_adds_a_second_name_of_a_server_is_warned_about(
    replicas: list[ScriptedReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = replicas[0].url
    assert url.startswith("http://127.0.0.1:")
    alias = url.replace("127.0.0.1", "localhost")
    path = tmp_path / "gw.yaml"
    _write(path, [url, replicas[1].url])
    caplog.set_level(logging.WARNING, logger="loragate.gateway")
    auth = {"Authorization": "Bearer t"}
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        _write(path, [url, replicas[1].url, alias])  # r2 = r0
        async with http.post(gw.url + "/admin/reload", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["replicas_added"] == ["r2"]
        (message,) = same_server_warnings(caplog)
        assert f"replicas r0 ({url}) and r2 ({alias})" in message
        # A reload that adds no such pair says nothing more (r2 is still r0: warned of once).
        _write(path, [url, replicas[1].url, alias, "http://no-such-host.invalid:1"])
        async with http.post(gw.url + "/admin/reload", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["replicas_added"] == ["r3"]
        assert len(same_server_warnings(caplog)) == 1
