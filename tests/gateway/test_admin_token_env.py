"""``LORAGATE_ADMIN_TOKEN`` follows ``admin.token``'s rule (14ec46c): a value no
``Authorization`` header can carry stops ``loragate serve`` at start-up and is a rejected
reload, the error naming the variable (before, a gateway started whose admin API no request
could ever open)."""

from __future__ import annotations

import asyncio
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
