"""``POST /admin/reload`` of a file whose reading used to fail other than as a bad file says
so: it is a 400 in the OpenAI error shape naming the key (``invalid_config``), counted
``rejected`` (not ``error``), nothing applied, and the gateway serves on.

The inputs that made a reload fail other than on a bad file (a 500 ``reload_failed``, logged
with its traceback by ``reload.log_reload_failure``, counted ``error``) were all holes in
validation: an adapter path with a NUL (``~`` and a user name holding one: ``ValueError:
embedded null byte`` out of ``os.path.expanduser`` in the rank check; it was this test's
trigger), a replica URL ``urlsplit`` cannot read (``http://[::1``: ``ValueError: Invalid IPv6
URL``), an integer too large for a float as a number of seconds (``OverflowError``); before
them, an ``adapter_config.json`` nested deeper than ``json`` recurses (now an unreadable folder,
test_adapter_rank_unreadable.py) and YAML nested too deep (test_config_reload_lines.py). No
input is known any more that makes a reload fail while *applying* a valid file, so the 500
path has no real trigger to test with."""

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


def _doc(replicas: list[ScriptedReplica], adapter_path: str = "/loras/lora-0") -> dict[str, Any]:
    return {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [{"name": "lora-0", "path": adapter_path}],
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _bad_url(doc: dict[str, Any]) -> dict[str, Any]:
    doc["replicas"][1]["url"] = "http://[::1"
    return doc


def _too_many_seconds(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "limits": {"request_timeout_s": 10**400}}


# (what the file holds, its key, the start of the message after the key)
FORMER_TRIGGERS = [
    (
        lambda doc: {**doc, "adapters": [{"name": "lora-0", "path": "~\0nobody/lora-0"}]},
        "adapters[0].path",
        "character '\\x00' at position 1 is not allowed in an adapter path",
    ),
    (_bad_url, "replicas[1].url", "not a URL: Invalid IPv6 URL in 'http://[::1'"),
    (_too_many_seconds, "limits.request_timeout_s", "must be a positive number of seconds"),
]


@pytest.mark.parametrize(
    ("change", "key", "says"), FORMER_TRIGGERS, ids=["nul-path", "ipv6-url", "huge-seconds"]
)
async def test_a_former_trigger_of_a_failed_reload_is_a_rejected_bad_file(
    replicas: list[ScriptedReplica],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Any,
    key: str,
    says: str,
) -> None:
    r0, r1 = replicas
    path = _write(tmp_path / "gw.yaml", _doc([r0]))
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        _write(path, change(_doc([r0, r1])))  # r1 added, if it were applied
        caplog.set_level(logging.WARNING, logger="loragate")
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 400, await resp.text()  # before: 500 reload_failed
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_config")
        assert error["param"] == key
        assert error["message"].startswith(f"{path}:"), error["message"]
        assert f": {key}: {says}" in error["message"]
        rejected = [
            r
            for r in caplog.records
            if r.getMessage().startswith("config reload rejected, keeping the running config")
        ]
        assert len(rejected) == 1 and key in rejected[0].getMessage()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'loragate_config_reloads_total{result="rejected"} 1.0' in text
        assert 'loragate_config_reloads_total{result="error"} 0.0' in text
        assert 'loragate_config_reloads_total{result="ok"} 0.0' in text
        # Nothing applied (r1 not added), serving on with the running config.
        for _ in range(3):
            raw = await client.completions.with_raw_response.create(
                model="lora-0", prompt="x", max_tokens=1
            )
            assert raw.headers["x-loragate-replica"] == "r0"
        assert r1.requests == []

        # The file fixed: the next reload applies it.
        _write(path, _doc([r0, r1]))
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["replicas_added"] == ["r1"]
