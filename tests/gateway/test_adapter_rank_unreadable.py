"""An adapter folder whose ``adapter_config.json`` ``json`` cannot read, as JSON nested deeper
than its parser recurses or an integer of more than 4,300 digits, is an unreadable folder for
the gateway's rank check, as a file that is not JSON is: the given rank is taken, else 8 is
assumed and said with the reason. Before, ``twin.adapters.read_adapter_folder`` let the
``RecursionError`` / ``ValueError`` through: ``load_config`` raised it and
``POST /admin/adapters`` answered a 500."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, gateway_config

from loragate.gateway import load_config, running_gateway

TOKEN = "rank-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEEP_REASON = "cannot read adapter_config.json: nested too deep for a JSON parser"
DIGITS_REASON = "cannot read adapter_config.json: Exceeds the limit (4300 digits)"


def _folders(root: Path) -> tuple[str, str]:
    deep, digits = root / "deep", root / "digits"
    deep.mkdir()
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    digits.mkdir()
    (digits / "adapter_config.json").write_text('{"r": 1' + "0" * 5000 + "}", encoding="utf-8")
    return str(deep), str(digits)


def test_the_config_file_takes_the_given_rank_or_assumes_8_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep, digits = _folders(tmp_path)
    doc = {
        "base_model": BASE,
        "replicas": ["http://127.0.0.1:1"],  # only read, never called
        "adapters": [
            {"name": "deep", "path": deep},
            {"name": "digits", "path": digits, "rank": 16},
        ],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="loragate.gateway.config_file"):
        config = load_config(path)
    assert [(a.name, a.rank) for a in config.adapters] == [("deep", 8), ("digits", 16)]
    (warning,) = caplog.records
    assert warning.getMessage().endswith(f"deep ({deep}/adapter_config.json: {DEEP_REASON})")


async def _add(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + "/admin/adapters", headers=AUTH, json=body) as resp:
        return resp.status, await resp.json()


async def test_admin_registration_takes_the_given_rank_or_assumes_8_saying_why(
    replicas: list[ScriptedReplica], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep, digits = _folders(tmp_path)
    for rep in replicas:  # the replicas load them (a registration is tried there)
        rep.readable_paths += (deep, digits)
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        with caplog.at_level(logging.INFO, logger="loragate.gateway.admin"):
            status, body = await _add(http, gw.url, {"name": "deep", "path": deep})
            assert status == 201, body
            assert (body["rank"], body["rank_source"]) == (8, "default")
            status, body = await _add(http, gw.url, {"name": "digits", "path": digits})
            assert status == 201, body
            assert (body["rank"], body["rank_source"]) == (8, "default")
            given = {"name": "given", "path": digits, "rank": 32}
            status, body = await _add(http, gw.url, given)
            assert (status, body["rank"], body["rank_source"]) == (201, 32, "request")
        said = [r.getMessage() for r in caplog.records if "registered adapter" in r.getMessage()]
        assert said[0].endswith(f"no rank was given and {deep}/adapter_config.json: {DEEP_REASON}")
        assert f"{digits}/adapter_config.json: {DIGITS_REASON}" in said[1]
        assert f"rank 32 as given ({digits}/adapter_config.json: {DIGITS_REASON}" in said[2]
