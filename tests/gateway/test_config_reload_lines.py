"""A reload of a bad file names the file, the line and column of the key, and the key, in the
400's message (``param`` the key) and in the WARNING, as ``loragate serve`` does at start-up;
YAML nested too deep is such a bad file (``rejected``), not a failure of the gateway
(``error``: PyYAML's RecursionError before, a 500)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica

from loragate.gateway import load_config, running_gateway

TOKEN = "reload-lines-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _doc(replica: ScriptedReplica) -> dict[str, Any]:
    return {
        "admin": {"token": TOKEN},
        "base_model": BASE,
        "limits": {"request_timeout_s": 30},
        "poller": {"interval_s": 3600},
        "replicas": [{"id": replica.name, "url": replica.url}],
    }


async def _reload(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/admin/reload", headers=AUTH) as resp:
        return resp.status, (await resp.json())["error"]


@pytest.mark.parametrize(
    ("spoil", "param", "expected"),
    [
        (
            lambda text: text.replace("request_timeout_s: 30", "request_timout_s: 30"),
            "limits.request_timout_s",
            "5:3: limits.request_timout_s: unknown key "
            "(is 'request_timout_s' a misspelling of 'request_timeout_s'?)",
        ),
        (
            lambda text: text.replace("request_timeout_s: 30", "request_timeout_s: -3"),
            "limits.request_timeout_s",
            "5:3: limits.request_timeout_s: must be a positive number of seconds, got -3",
        ),
        (
            lambda text: text.replace("interval_s: 3600", "interval_s: " + "[" * 500 + "]" * 500),
            None,
            "7:113: nested more than 100 levels deep",
        ),
    ],
    ids=["misspelt-key", "bad-value", "nested-too-deep"],
)
async def test_a_rejected_reload_names_the_line_in_its_answer_and_its_warning(
    replicas: list[ScriptedReplica],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    spoil: Any,
    param: str | None,
    expected: str,
) -> None:
    path = tmp_path / "gw.yaml"
    good = yaml.safe_dump(_doc(replicas[0]))
    path.write_text(good, encoding="utf-8")
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        path.write_text(spoil(good), encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="loragate.gateway"):
            status, error = await _reload(http, gw.url)
        assert status == 400, error
        assert error["message"].startswith(f"{path}:{expected}")
        assert error["param"] == param and error["code"] == "invalid_config"
        (record,) = [r for r in caplog.records if "reload" in r.getMessage()]
        assert record.levelno == logging.WARNING
        # (the request's id at the end: what asked for the reload)
        assert re.fullmatch(
            re.escape(f"config reload rejected, keeping the running config: {error['message']}")
            + r" \(POST /admin/reload, request [0-9a-f]{12}-[0-9]+\)",
            record.getMessage(),
        ), record.getMessage()
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'loragate_config_reloads_total{result="rejected"} 1.0' in text
        assert 'loragate_config_reloads_total{result="error"} 0.0' in text
        # The running config stays in force, and the file fixed applies.
        path.write_text(good.replace("request_timeout_s: 30", "request_timeout_s: 20"), "utf-8")
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
        assert gw.gateway.config.limits.request_timeout_s == 20
