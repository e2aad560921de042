"""SIGHUP reloads of ``loragate serve`` that fail leave the running config in force, are logged
and counted, and the gateway serves on.

* A replica ``api_key`` that no HTTP header can carry (not Latin-1) used to pass config
  validation and fail the reload half-way while applying it (b749932); it is a bad file now,
  refused at load naming the key (``rejected``, nothing applied).
* YAML nested deeper than the YAML reader could recurse was a ``RecursionError`` out of
  ``load_config`` (counted ``error``, a traceback of thousands of lines); it is a bad file
  now, refused naming the file, the line and column where it gets too deep.
* An adapter path with a NUL (``~`` and a user name holding one: ``os.path.expanduser``
  raised ``ValueError: embedded null byte`` in the config's rank check) was the last known
  trigger of a reload that fails other than on a bad file (counted ``error``, logged with
  its traceback); it is a bad file now too, refused naming ``adapters[0].path``. The
  triggers before it (an ``adapter_config.json`` nested deeper than ``json`` recurses, YAML
  nested too deep, an ``api_key`` no header can carry) are all refused or read as well. No
  input is known any more that makes a reload fail while *applying* a valid file, so the
  catch-all (``reload.log_reload_failure``, the ``error`` count) has no real trigger here;
  this test asserts what is true: each former trigger is ``rejected``, nothing is applied,
  and the gateway serves on.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gateway_harness import BASE, ScriptedReplica, serve_process
from prometheus_client.parser import text_string_to_metric_families

from loragate.core.errors import ConfigError
from loragate.gateway import load_config

# Deeper than the YAML reader could recurse (Python's default recursion limit is 1000).
TOO_DEEP = f"base_model: {BASE}\nreplicas: " + "[" * 5000 + "]" * 5000 + "\n"


def _write(path: Path, replicas: list[dict[str, Any]], adapter_path: str = "/loras/lora-0") -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": replicas,
        "adapters": [{"name": "lora-0", "path": adapter_path}],
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


def _reloads(seen: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        result: seen[("loragate_config_reloads_total", (("result", result),))]
        for result in ("ok", "rejected", "error")
    }


async def _complete(http: aiohttp.ClientSession, url: str) -> str:
    body = {"model": "lora-0", "prompt": "p", "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-loragate-replica"]


async def test_rejected_sighup_reloads_are_logged_and_change_nothing(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    r0, r1 = ({"id": r.name, "url": r.url} for r in replicas)
    path = _write(tmp_path / "gw.yaml", [r0])
    bad = [{**r0, "api_key": "ключ"}, r1]  # r0's key changes (replaced), r1 added
    _write(tmp_path / "check.yaml", bad)
    with pytest.raises(ConfigError, match=r"replicas\[0\]\.api_key: "):
        load_config(tmp_path / "check.yaml")
    (tmp_path / "deep.yaml").write_text(TOO_DEEP, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"deep\.yaml:2:\d+: nested more than 100 levels deep"):
        load_config(tmp_path / "deep.yaml")
    # The last former trigger of an 'error' reload (see the docstring): a bad file now.
    unexpandable = "~\0nobody/lora-0"
    with pytest.raises(ConfigError, match=r"adapters\[0\]\.path: character '\\x00' at position 1"):
        load_config(_write(tmp_path / "check.yaml", [r0], adapter_path=unexpandable))
    async with serve_process(path) as serve, aiohttp.ClientSession() as http:
        assert await _complete(http, serve.url) == "r0"

        # A key no header can carry: a bad file, refused naming the key.
        _write(path, bad)
        serve.proc.send_signal(signal.SIGHUP)
        line = await serve.wait_for_log(r"config reload rejected, keeping the running config: (.*)")
        where = re.escape(str(path))  # then the line and column of the key, then the key
        assert re.match(rf"{where}:\d+:\d+: replicas\[0\]\.api_key: character '\\u043a'", line[1])
        assert _reloads(await _metrics(serve.url)) == {"ok": 0, "rejected": 1, "error": 0}

        # YAML nested too deep: a bad file too, named at its line (was a RecursionError).
        path.write_text(TOO_DEEP, encoding="utf-8")
        serve.proc.send_signal(signal.SIGHUP)
        line = await serve.wait_for_log(r"config reload rejected, keeping the running config: (.*)")
        assert line[1].startswith(f"{path}:2:")
        assert line[1].endswith("nested more than 100 levels deep (a loragate file needs a few)")
        assert _reloads(await _metrics(serve.url)) == {"ok": 0, "rejected": 2, "error": 0}

        # An adapter path with a NUL: a bad file (was a ValueError out of the rank check,
        # counted 'error' and logged with its traceback).
        _write(path, [r0, r1], adapter_path=unexpandable)
        serve.proc.send_signal(signal.SIGHUP)
        line = await serve.wait_for_log(r"config reload rejected, keeping the running config: (.*)")
        assert re.match(rf"{where}:\d+:\d+: adapters\[0\]\.path: character '\\x00'", line[1])
        seen = await _metrics(serve.url)
        assert _reloads(seen) == {"ok": 0, "rejected": 3, "error": 0}

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
        assert _reloads(seen) == {"ok": 1, "rejected": 3, "error": 0}
        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0
