"""A rejected reload is logged the same way however it was asked for: one WARNING naming the
file and the reason, for ``POST /admin/reload`` (which also answers 400) and for SIGHUP."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, serve_process

from loragate.gateway import load_config, running_gateway

TOKEN = "reload-log-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _doc(replicas: list[ScriptedReplica], **sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0", "rank": 8}],
        "routing": "round_robin",
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }
    doc.update(sections)
    return doc


def _break(path: Path, how: str, replicas: list[ScriptedReplica]) -> str:
    """Spoil the file at ``path``; returns what the logged reason must contain."""
    if how == "policy":
        path.write_text(yaml.safe_dump(_doc(replicas, routing="fastest")), encoding="utf-8")
        return "routing"
    if how == "unknown key":
        path.write_text(yaml.safe_dump(_doc(replicas, colour="red")), encoding="utf-8")
        return "colour"
    if how == "yaml":
        path.write_text("base_model: [tiny-llama\n", encoding="utf-8")
        return f"{path}:"
    path.unlink()
    return "cannot read config file"


@pytest.mark.parametrize("how", ["policy", "unknown key", "yaml", "missing file"])
async def test_a_rejected_admin_reload_is_logged_with_the_file_and_the_reason(
    replicas: list[ScriptedReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(_doc(replicas)), encoding="utf-8")
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        reason = _break(path, how, replicas)
        with caplog.at_level(logging.WARNING, logger="loragate.gateway"):
            async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
                assert resp.status == 400
                message = (await resp.json())["error"]["message"]
    (record,) = [r for r in caplog.records if "reload" in r.getMessage()]
    assert (record.name, record.levelno) == ("loragate.gateway.reload", logging.WARNING)
    logged = record.getMessage()
    # the file named once: a message that names it already (the YAML reader's) is not prefixed
    named = message if str(path) in message else f"{path}: {message}"
    assert re.fullmatch(  # (the request's id at the end: what asked for the reload)
        re.escape(f"config reload rejected, keeping the running config: {named}")
        + r" \(POST /admin/reload, request [0-9a-f]{12}-[0-9]+\)",
        logged,
    ), logged
    assert logged.count(str(path)) == 1
    assert reason in logged


async def test_a_rejected_sighup_reload_is_logged_like_an_admin_one(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(_doc(replicas[:1])), encoding="utf-8")
    async with serve_process(path) as serve:
        path.write_text(yaml.safe_dump(_doc(replicas[:1], routing="fastest")), encoding="utf-8")
        serve.proc.send_signal(signal.SIGHUP)
        match = await serve.wait_for_log(r"(\w+) ([\w.]+): config reload rejected(.*)")
        assert match.group(1, 2) == ("WARNING", "loragate.gateway.reload")
        # the file, then the line and column of the key, then the key
        assert re.match(
            rf", keeping the running config: {re.escape(str(path))}:\d+:1: routing: ",
            match.group(3),
        )
        assert re.search(r"fastest", match.group(3))


async def test_a_reload_that_needs_a_restart_says_so_as_a_warning(
    replicas: list[ScriptedReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(_doc(replicas)), encoding="utf-8")
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        doc = _doc(replicas)
        doc["poller"] = {"interval_s": 0.7}
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="loragate.gateway"):
            async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
                assert resp.status == 200
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "config reloaded, but these sections keep their old values until a restart: poller"
    ]
