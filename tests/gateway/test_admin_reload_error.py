"""``POST /admin/reload`` that fails other than on a bad file: a 500 in the OpenAI error shape
saying that the running config stays in force, logged with the file and its traceback (as a
SIGHUP reload's failure is: ``reload.log_reload_failure``), counted as ``error``; the gateway
serves on. Before, the exception reached aiohttp: its plain-text 500 page, no loragate log line.

The real trigger that validation does not catch today: an adapter path that ``load_config``'s
rank check cannot expand, ``~`` and a user name holding a NUL character (``ValueError`` out of
``os.path.expanduser``; see test_reload_sighup_error.py). The triggers before are a bad file
now, YAML nested too deep (a 400 naming its line, test_config_reload_lines.py), or an
unreadable adapter folder, an ``adapter_config.json`` nested deeper than ``json`` recurses
(the rank is assumed, said in a warning: test_adapter_rank_unreadable.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, openai_client

from loragate.gateway import load_config, running_gateway

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _write(
    path: Path, replicas: list[ScriptedReplica], adapter_path: str = "/loras/lora-0"
) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [{"name": "lora-0", "path": adapter_path}],
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def test_a_reload_that_fails_otherwise_is_a_logged_500_in_the_error_shape(
    replicas: list[ScriptedReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r0, r1 = replicas
    path = _write(tmp_path / "gw.yaml", [r0])
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        _write(path, [r0], adapter_path="~\0nobody/lora-0")  # the trigger (see the docstring)
        caplog.set_level(logging.ERROR, logger="loragate")
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 500
            assert resp.content_type == "application/json", await resp.text()
            error = (await resp.json())["error"]
        assert error["type"] == "server_error" and error["code"] == "reload_failed"
        assert error["param"] is None
        assert error["message"].startswith("config reload failed (ValueError: embedded null byte")
        assert "the running config stays in force" in error["message"]
        failed = [
            r
            for r in caplog.records
            if r.getMessage().startswith(f"config reload (POST /admin/reload) of {path} failed")
        ]
        assert len(failed) == 1 and failed[0].exc_info is not None
        assert failed[0].exc_info[0] is ValueError
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'loragate_config_reloads_total{result="error"} 1.0' in text
        assert 'loragate_config_reloads_total{result="ok"} 0.0' in text
        # Serving on, with the running config.
        raw = await client.completions.with_raw_response.create(
            model="lora-0", prompt="x", max_tokens=1
        )
        assert raw.headers["x-loragate-replica"] == "r0"

        # A bad file is still a 400 naming the key; a good one applies.
        _write(path, [r0, r1]).write_text(
            path.read_text().replace(r1.url, r1.url + "/ x"), encoding="utf-8"
        )
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["param"] == "replicas[1].url" and error["code"] == "invalid_config"
        _write(path, [r0, r1])
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["replicas_added"] == ["r1"]
