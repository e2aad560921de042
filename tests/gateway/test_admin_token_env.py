"""``LORAGATE_ADMIN_TOKEN`` wins over ``admin.token`` (and ``LORAGATE_METRICS_TOKEN`` over
``metrics.token``), with a WARNING when they differ, and follows its rule (14ec46c): a value no
``Authorization`` header can carry stops ``loragate serve`` at start-up and is a rejected
reload, the error naming the variable (before, a gateway started whose admin API no request
could ever open)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica

from loragate.gateway import load_config, running_gateway


async def test_serve_refuses_to_start_naming_the_variable(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n", encoding="utf-8")
    env = {**os.environ, "LORAGATE_ADMIN_TOKEN": "s3cret\n"}  # a secret file's newline
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loragate.cli", "serve", "--config", str(path),
        "--host", "127.0.0.1", "--port", "0",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # before: it started serving (and never exited)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    message = err.decode()
    assert "environment variable LORAGATE_ADMIN_TOKEN" in message
    assert r"'\n' at position 6" in message and "s3cret" not in message


async def test_a_reload_checks_the_variable_and_keeps_the_running_token(
    replicas: list[ScriptedReplica], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAGATE_ADMIN_TOKEN", "env-token")
    path = tmp_path / "gw.yaml"
    path.write_text(f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n", encoding="utf-8")
    auth = {"Authorization": "Bearer env-token"}
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        monkeypatch.setenv("LORAGATE_ADMIN_TOKEN", "env-token ")
        async with http.post(gw.url + "/admin/reload", headers=auth) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["param"] == "environment variable LORAGATE_ADMIN_TOKEN"
        assert "starts or ends with a space" in error["message"]
        async with http.get(gw.url + "/admin/replicas", headers=auth) as resp:
            assert resp.status == 200  # the running config, and its token, stay


def _ignored_token_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "in the config file" in r.getMessage()
    ]


async def test_the_variables_win_over_the_files_tokens_with_a_warning(
    replicas: list[ScriptedReplica],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token set from a secret at deploy time overrides the checked-in file's (before, the
    file's ``change-me`` answered 200, the variable's 401, and nothing was logged)."""
    monkeypatch.setenv("LORAGATE_ADMIN_TOKEN", "admin-from-env")
    monkeypatch.setenv("LORAGATE_METRICS_TOKEN", "metrics-from-env")
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n"
        "admin: {token: change-me}\nmetrics: {token: scrape-me}\n",
        encoding="utf-8",
    )
    caplog.set_level(logging.WARNING, logger="loragate.gateway")
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):

        async def status(method: str, path: str, token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.request(method, gw.url + path, headers=headers) as resp:
                return resp.status

        assert await status("GET", "/admin/replicas", "admin-from-env") == 200
        assert await status("GET", "/admin/replicas", "change-me") == 401
        assert await status("GET", "/metrics", "metrics-from-env") == 200
        assert await status("GET", "/metrics", "scrape-me") == 401
        (started,) = _ignored_token_warnings(caplog)
        assert started.startswith("at start-up: admin.token and metrics.token in the config")
        assert "LORAGATE_ADMIN_TOKEN and LORAGATE_METRICS_TOKEN are set" in started
        # At each reload again; the file's admin token is now the variable's: not warned of.
        path.write_text(
            f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n"
            "admin: {token: admin-from-env}\nmetrics: {token: scrape-me}\n",
            encoding="utf-8",
        )
        assert await status("POST", "/admin/reload", "admin-from-env") == 200
        assert await status("GET", "/metrics", "scrape-me") == 401
        _, reloaded = _ignored_token_warnings(caplog)
        assert reloaded.startswith("at reload: metrics.token in the config file is ignored")
        assert "because LORAGATE_METRICS_TOKEN is set to another token" in reloaded
    secrets = ("change-me", "scrape-me", "admin-from-env", "metrics-from-env")
    for message in _ignored_token_warnings(caplog):
        assert not any(secret in message for secret in secrets)
