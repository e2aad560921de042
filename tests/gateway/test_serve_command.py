"""``loragate serve`` as a real process (uvloop entry point) in front of a scripted replica."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
from gateway_harness import BASE, ScriptedReplica

from loragate.cli import main


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: object) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: m\nreplicas: [{url: 'ftp://x'}]\n", encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "replicas[0].url" in err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2


async def test_serve_process_proxies_and_stops_on_sigterm(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n"
        "adapters: [{name: lora-0, path: /loras/lora-0}]\n",
        encoding="utf-8",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loragate.cli", "serve", "--config", str(path),
        "--host", "127.0.0.1", "--port", "0",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        url = None
        for _ in range(50):  # bounded: the start-up log line carries the bound URL
            line = (await asyncio.wait_for(proc.stderr.readline(), timeout=30)).decode()
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url is not None
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + "/v1/completions", json={"model": "lora-0", "prompt": "p"}) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["model"] == "lora-0"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
