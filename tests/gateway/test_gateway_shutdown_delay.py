"""``server.shutdown_delay_s``: Kubernetes sends SIGTERM and takes the pod out of its Service's
endpoints at the same time, so new connections keep arriving for a few seconds. During the
delay ``loragate serve`` goes on accepting and serving them while ``GET /readyz`` answers 503;
then the usual drain. A ``loragate serve`` process over loopback; waits are hang guards."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica, openai_client, serve_process, wait_until

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import parse_config_text


def _config_file(
    tmp_path: Path, rep: ScriptedReplica, *, delay_s: float, drain_s: float = 0.3
) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"base_model: {BASE}\nreplicas: ['{rep.url}']\n"
        f"server: {{shutdown_delay_s: {delay_s}, shutdown_timeout_s: {drain_s}}}\n",
        encoding="utf-8",
    )
    return path


async def _readyz(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
        return resp.status, json.loads(await resp.read())


async def test_during_the_delay_new_requests_are_served_and_readyz_is_503(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    rep = replicas[0]
    async with serve_process(_config_file(tmp_path, rep, delay_s=600)) as serve:
        assert (await _readyz(serve.url))[0] == 200
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"SIGTERM: shutting down")
        await serve.wait_for_log(r"still accepting connections for 600 s")
        status, body = await _readyz(serve.url)  # a new connection: accepted
        assert (status, body["error"]["code"]) == (503, "shutting_down")
        async with openai_client(serve.url) as client:  # a new client, a new connection
            answer = await client.completions.create(model=BASE, prompt="p", max_tokens=2)
            assert answer.choices[0].text == "hi from r0"
            stream = await client.completions.create(
                model=BASE, prompt="p", max_tokens=3, stream=True
            )
            assert "".join([c.choices[0].text async for c in stream]) == " one two three"
        # A second signal ends the delay: the drain follows (nothing in flight), exit 0.
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"SIGTERM again")
        await serve.wait_for_log(r"not accepting connections; 0 requests in flight")
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0
    assert len(rep.requests) == 2


async def test_the_delay_ends_by_itself_then_the_drain_runs(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    rep = replicas[0]
    async with serve_process(_config_file(tmp_path, rep, delay_s=0.2)) as serve:
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"still accepting connections for 0\.2 s")
        await serve.wait_for_log(r"not accepting connections; 0 requests in flight")
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0


async def test_a_request_running_through_the_delay_finishes_in_the_drain(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    rep = replicas[0]
    rep.answer_gate = asyncio.Event()  # the replica holds non-streaming answers
    path = _config_file(tmp_path, rep, delay_s=0.2, drain_s=600)
    async with serve_process(path) as serve, openai_client(serve.url) as client:
        held = asyncio.create_task(client.completions.create(model=BASE, prompt="p"))
        await wait_until(lambda: rep.requests, "the request to reach the replica")
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"still accepting connections for 0\.2 s .*; 1 request in flight")
        await serve.wait_for_log(r"not accepting connections; 1 request in flight")
        rep.answer_gate.set()
        answer = await asyncio.wait_for(held, timeout=30)
        assert answer.choices[0].text == "hi from r0"
        await serve.wait_for_log(r"1 request finished during the drain, 0 cut")
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0


async def test_without_a_delay_the_listener_closes_at_once(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(f"base_model: {BASE}\nreplicas: ['{replicas[0].url}']\n", encoding="utf-8")
    async with serve_process(path) as serve:
        serve.proc.send_signal(signal.SIGTERM)
        line = await serve.wait_for_log(r"shutdown: (still accepting|not accepting)")
        assert line.group(1) == "not accepting"  # today's behaviour is the default
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0


def test_shutdown_delay_is_a_validated_server_key() -> None:
    base: dict[str, Any] = {"base_model": "m", "replicas": ["http://127.0.0.1:1"]}
    assert config_from_mapping(base).server.shutdown_delay_s == 0.0
    for good in (0, 5, 2.5):
        server = {"shutdown_delay_s": good}
        assert config_from_mapping({**base, "server": server}).server.shutdown_delay_s == good
    for bad in (-1, "5s", True, float("inf"), None):
        with pytest.raises(ConfigError, match=r"server\.shutdown_delay_s"):
            config_from_mapping({**base, "server": {"shutdown_delay_s": bad}})


def test_a_bad_shutdown_delay_names_the_file_and_line() -> None:
    text = "base_model: m\nreplicas: ['http://127.0.0.1:1']\nserver:\n  shutdown_delay_s: -5\n"
    with pytest.raises(ConfigError) as raised:
        parse_config_text(text, source="gw.yaml")
    assert str(raised.value) == (
        "gw.yaml:4:3: server.shutdown_delay_s: must be a number of seconds >= 0, got -5"
    )
