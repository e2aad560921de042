"""An adapter's rank comes from its folder's adapter_config.json (PEFT's ``r``) when the gateway
can read it, for ``POST /admin/adapters`` and for the config file: a given rank that disagrees
is refused naming both; without a readable folder or a rank, 8 is assumed and said."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, gateway_config

from loragate.core.errors import ConfigError
from loragate.gateway import load_config, running_gateway
from loragate.twin.adapters import write_adapter_folder

TOKEN = "rank-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _add(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + "/admin/adapters", headers=AUTH, json=body) as resp:
        return resp.status, await resp.json()


@pytest.fixture
def r16(tmp_path: Path) -> str:
    return write_adapter_folder(str(tmp_path / "r16"), rank=16)


async def test_admin_registration_reads_the_rank_from_the_folder(
    replicas: list[ScriptedReplica], r16: str, caplog: pytest.LogCaptureFixture
) -> None:
    for rep in replicas:  # the replicas read the same folder (a registration is tried there)
        rep.readable_paths += (r16,)
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        status, body = await _add(http, gw.url, {"name": "a", "path": r16})
        assert status == 201, body
        assert (body["rank"], body["rank_source"]) == (16, "adapter_config")
        status, body = await _add(http, gw.url, {"name": "b", "path": r16, "rank": 16})
        assert (status, body["rank"], body["rank_source"]) == (201, 16, "adapter_config")

        status, body = await _add(http, gw.url, {"name": "c", "path": r16, "rank": 8})
        assert status == 400
        error = body["error"]
        assert error["param"] == "rank"
        assert "rank 8 disagrees with r = 16" in error["message"]
        assert f"{r16}/adapter_config.json" in error["message"]

        with caplog.at_level(logging.INFO, logger="loragate.gateway.admin"):
            status, body = await _add(http, gw.url, {"name": "d", "path": "/loras/d"})
            assert (status, body["rank"], body["rank_source"]) == (201, 8, "default")
            status, body = await _add(http, gw.url, {"name": "e", "path": "/loras/e", "rank": 32})
            assert (status, body["rank"], body["rank_source"]) == (201, 32, "request")
        (assumed,) = [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and "embedded state store" not in r.getMessage()
        ]
        assert "adapter d (/loras/d) with rank 8 assumed" in assumed.getMessage()
        assert "cannot read /loras/d/adapter_config.json" in assumed.getMessage()

        async with http.get(gw.url + "/admin/adapters", headers=AUTH) as resp:
            ranks = {a["name"]: a["rank"] for a in (await resp.json())["adapters"]}
        assert {n: ranks[n] for n in "abde"} == {"a": 16, "b": 16, "d": 8, "e": 32}
        assert "c" not in ranks


def _write(path: Path, urls: list[str], adapters: list[dict[str, Any]]) -> Path:
    doc = {
        "base_model": BASE,
        "replicas": [{"id": f"r{i}", "url": url} for i, url in enumerate(urls)],
        "adapters": adapters,
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_config_file_ranks_come_from_the_folders(
    tmp_path: Path, r16: str, caplog: pytest.LogCaptureFixture
) -> None:
    urls = ["http://127.0.0.1:1"]  # only read, never called
    path = _write(
        tmp_path / "gw.yaml",
        urls,
        [
            {"name": "from-folder", "path": r16},
            {"name": "given", "path": "/loras/given", "rank": 32},
            {"name": "assumed", "path": "/loras/assumed"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="loragate.gateway.config_file"):
        config = load_config(path)
    assert [(a.name, a.rank) for a in config.adapters] == [
        ("from-folder", 16), ("given", 32), ("assumed", 8),
    ]  # fmt: skip
    (warning,) = caplog.records
    message = warning.getMessage()
    assert message.startswith(f"{path}: rank 8 assumed") and "assumed (" in message
    assert "/loras/assumed/adapter_config.json" in message and "given" not in message

    _write(path, urls, [{"name": "lora-0", "path": r16, "rank": 8}])
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "adapters[0].rank"
    assert "rank 8 disagrees with r = 16" in str(err.value)


async def test_a_reload_with_a_rank_that_disagrees_is_rejected(
    replicas: list[ScriptedReplica], tmp_path: Path, r16: str
) -> None:
    urls = [r.url for r in replicas]
    path = _write(tmp_path / "gw.yaml", urls, [{"name": "lora-0", "path": r16}])
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        assert gw.gateway.catalog.adapters["lora-0"].rank == 16
        _write(path, urls, [{"name": "lora-0", "path": r16, "rank": 8}])
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["param"] == "adapters[0].rank" and "r = 16" in error["message"]
        assert gw.gateway.catalog.adapters["lora-0"].rank == 16
