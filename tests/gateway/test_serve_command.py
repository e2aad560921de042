"""``loragate serve`` as a real process (uvloop entry point) in front of a scripted replica."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
from gateway_harness import BASE, ScriptedReplica, serve_process

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
    async with serve_process(path) as serve:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                serve.url + "/v1/completions", json={"model": "lora-0", "prompt": "p"}
            ) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["model"] == "lora-0"
        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0
