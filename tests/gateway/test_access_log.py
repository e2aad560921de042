"""The proxy's access log: one DEBUG line per finished request on ``loragate.gateway.proxy``
(request id, path, tenant, model, replica, status or outcome, latency, TTFT when streamed,
retries), none at INFO. In-process gateway over loopback, the openai SDK as client, and
``loragate serve --log-level DEBUG`` for the CLI's wiring."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import yaml
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serve_process,
    serving_replicas,
)
from log_lines import PROXY_LOG, access_lines

from loragate.gateway import running_gateway

TENANTS = [{"name": "acme", "api_keys": ["sk-acme"]}]


@pytest.fixture
async def replicas() -> AsyncIterator[list[ScriptedReplica]]:
    async with serving_replicas(ScriptedReplica) as out:
        yield out


async def _requests(url: str) -> None:
    async with openai_client(url, key="sk-acme") as client:
        await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        events = await client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        _ = [e async for e in events]
    async with openai_client(url, key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)


async def test_one_debug_line_per_request(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    r0, _ = replicas
    r0.mode = "drop"  # the first request is retried on r1
    cfg = gateway_config([r.url for r in replicas], routing="round_robin", tenants=TENANTS)
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    async with running_gateway(cfg, port=0) as gw:
        await _requests(gw.url)
    lines = access_lines(caplog)
    assert len(lines) == 3, lines
    ok, streamed, refused = lines
    assert re.fullmatch(
        r"request [0-9a-f]{12}-\d+ /v1/completions tenant=acme model=<base> replica=r1 status=200 "
        r"latency_ms=[0-9.]+ retries=1 residency=base load_wait_ms=0.0",
        ok,
    ), ok
    assert re.fullmatch(
        r"request [0-9a-f]{12}-\d+ /v1/chat/completions tenant=acme model=<base> replica=r1 "
        r"status=200 "
        r"latency_ms=[0-9.]+ ttft_ms=[0-9.]+ retries=0 residency=base load_wait_ms=0.0",
        streamed,
    ), streamed
    assert refused.startswith("request ") and " /v1/completions tenant=- " in refused
    assert " replica=- status=401 " in refused
    assert " residency=none load_wait_ms=0.0" in refused


async def test_the_line_says_where_routing_found_the_adapter_and_the_load_wait(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    """residency= is where the shadow residency had the adapter on the replica chosen (as
    loragate_routing_residency_total counts it; base for the base model, none when no
    replica was chosen), load_wait_ms= how long the request waited for adapter loads."""
    cfg = gateway_config([replicas[0].url], tenants=TENANTS)
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, key="sk-acme") as client:
        for model in ("lora-0", "lora-0", BASE):
            await client.completions.create(model=model, prompt="p", max_tokens=1)
        events = await client.completions.create(
            model="lora-1", prompt="p", max_tokens=1, stream=True
        )
        _ = [e async for e in events]
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="no-such-lora", prompt="p", max_tokens=1)
    found = [
        re.search(r" model=(\S+) .* residency=(\S+) load_wait_ms=([0-9.]+)", line)
        for line in access_lines(caplog)
    ]
    assert all(found), access_lines(caplog)
    got = [(m.group(1), m.group(2), float(m.group(3))) for m in found if m is not None]
    assert [(model, residency) for model, residency, _ in got] == [
        ("lora-0", "unregistered"), ("lora-0", "gpu"), ("<base>", "base"),
        ("lora-1", "unregistered"), ("'no-such-lora'", "none"),
    ]  # fmt: skip
    waits = [wait for _, _, wait in got]
    assert waits[0] > 0 and waits[3] > 0  # (a load over loopback: well above 0.05 ms)
    assert waits[1] == waits[2] == waits[4] == 0.0


async def test_nothing_at_info(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = gateway_config([r.url for r in replicas], tenants=TENANTS)
    caplog.set_level(logging.INFO, logger=PROXY_LOG)
    async with running_gateway(cfg, port=0) as gw:
        await _requests(gw.url)
    assert not [r for r in caplog.records if r.name == PROXY_LOG], caplog.records


async def test_serve_at_debug_logs_requests(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    config = {
        "base_model": BASE,
        "replicas": [{"id": "r0", "url": replicas[0].url}],
        "poller": {"interval_s": 3600},
        "tenants": TENANTS,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    async with serve_process(path, "--log-level", "DEBUG") as serve:
        async with openai_client(serve.url, key="sk-acme") as client:
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        await serve.wait_for_log(
            r"request [0-9a-f]{12}-\d+ /v1/completions tenant=acme model=<base> replica=r0 "
            r"status=200 ",
            max_lines=400,
        )


async def test_serve_writes_json_lines_with_the_request_id_as_a_field(
    replicas: list[ScriptedReplica], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--log-format json``: every line one JSON object; a line about a request carries its
    id (a client's X-Request-Id taken whole, punctuation and all) as ``request_id``."""
    config = {
        "base_model": BASE,
        "replicas": [{"id": "r0", "url": replicas[0].url}],
        "poller": {"interval_s": 3600},
        "tenants": TENANTS,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("LORAGATE_LOG_FORMAT", "text")  # the option wins
    async with serve_process(path, "--log-level", "DEBUG", "--log-format", "json") as serve:
        async with openai_client(serve.url, key="sk-acme") as client:
            await client.completions.create(
                model=BASE, prompt="p", max_tokens=1,
                extra_headers={"X-Request-Id": "trace:42,(a)"},
            )  # fmt: skip
        found = await serve.wait_for_log(r"/v1/completions tenant=acme", max_lines=400)
    line = json.loads(found.string)
    assert line["request_id"] == "trace:42,(a)"
    assert line["level"] == "DEBUG" and line["logger"] == PROXY_LOG
    assert line["message"].startswith("request trace:42,(a) /v1/completions tenant=acme ")
    assert " residency=base load_wait_ms=0.0" in line["message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])


async def test_serve_takes_the_log_format_from_the_environment(
    replicas: list[ScriptedReplica], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LORAGATE_LOG_FORMAT=json`` without the option; a value it does not know is refused
    before the gateway starts."""
    config = {"base_model": BASE, "replicas": [{"id": "r0", "url": replicas[0].url}]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("LORAGATE_LOG_FORMAT", "json")
    async with serve_process(path, "--log-level", "DEBUG") as serve:
        async with openai_client(serve.url) as client:
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        found = await serve.wait_for_log(r"/v1/completions tenant=-", max_lines=400)
    line = json.loads(found.string)
    assert line["message"].startswith(f"request {line['request_id']} /v1/completions ")
    monkeypatch.setenv("LORAGATE_LOG_FORMAT", "yaml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loragate.cli", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    assert err.decode() == (
        "loragate serve: LORAGATE_LOG_FORMAT='yaml': expected one of text, json\n"
    )


@pytest.mark.parametrize(
    "model",
    [
        "x\nINFO loragate: forged line",
        "nul\x00byte\x1b[31m",
        "line\u2028separator",
        "long" + "y" * 100_000,
    ],
)
async def test_client_text_in_the_note_is_escaped_and_cut(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture, model: str
) -> None:
    """An unknown model's name is in the 404's message, which the line quotes as its note:
    control characters escaped, cut as ``model=`` is, so that the line stays one line."""
    cfg = gateway_config([r.url for r in replicas], tenants=TENANTS)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, key="sk-acme") as client:
        with caplog.at_level(logging.DEBUG, logger=PROXY_LOG), pytest.raises(openai.NotFoundError):
            await client.completions.create(model=model, prompt="p", max_tokens=1)
    (line,) = access_lines(caplog)
    assert line.splitlines() == [line]  # one line: no newline, no line separator
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", line)
    assert len(line) < 1000
    assert "status=404" in line
