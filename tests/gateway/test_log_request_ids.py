"""JSON logs (``loragate serve --log-format json``): every line about a request carries its id
as ``request_id``, also the lines whose text names the request otherwise or not at all: an
adapter load's (``for request <id>``), a load's refusal (it names the load's own X-Request-Id),
a config reload's (``(POST /admin/reload, request <id>)``) and the rate-limited 503
``no_replica_available`` line. The text of those lines is unchanged.

``loragate serve`` subprocesses and in-process gateways over loopback, scripted replicas that
answer (and refuse loads) as vLLM 0.32 does, the openai SDK as client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from gateway_harness import (
    BASE,
    ServeProcess,
    gateway_config,
    openai_client,
    picky_replicas,
    serve_process,
)

from loragate.gateway import running_gateway
from loragate.gateway.log_format import JsonFormatter

TOKEN = "admin-s3cret"


async def _lines_until(
    serve: ServeProcess, wanted: dict[str, str], *, max_lines: int = 500
) -> list[dict[str, Any]]:
    """The JSON lines the gateway writes until, for each of ``wanted`` (name: the start of a
    message), a line has come whose message starts so (bounded)."""
    assert serve.proc.stderr is not None
    lines: list[dict[str, Any]] = []
    missing = dict(wanted)
    for _ in range(max_lines):
        raw = await asyncio.wait_for(serve.proc.stderr.readline(), timeout=30)
        if not raw:
            break
        line = json.loads(raw)
        lines.append(line)
        for name, start in list(missing.items()):
            if line["message"].startswith(start):
                del missing[name]
        if not missing:
            return lines
    raise AssertionError(f"no line for {sorted(missing)} in {[x['message'] for x in lines]}")


def _about(lines: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    """The lines whose message names ``request_id`` (in any form: its loads' ids too)."""
    return [line for line in lines if request_id in line["message"]]


async def test_load_refusal_and_reload_lines_carry_the_request_id(tmp_path: Path) -> None:
    async with picky_replicas(1) as (replica,):
        replica.refuse = {"lora-1"}
        config = {
            "base_model": BASE,
            "replicas": [{"id": "r0", "url": replica.url}],
            "adapters": [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(2)],
            "poller": {"interval_s": 3600},
            "admin": {"token": TOKEN},
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        args = ("--log-level", "DEBUG", "--log-format", "json")
        async with serve_process(path, *args) as serve, openai_client(serve.url) as client:
            # An on-demand load (lora-0 is not registered on r0 yet).
            await client.completions.create(
                model="lora-0", prompt="p", max_tokens=1,
                extra_headers={"X-Request-Id": "on-demand:1"},
            )  # fmt: skip
            # A load the replica refuses (its only replica: the request fails).
            with pytest.raises(openai.APIStatusError):
                await client.completions.create(
                    model="lora-1", prompt="p", max_tokens=1,
                    extra_headers={"X-Request-Id": "refused:2"},
                )  # fmt: skip
            admin = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession() as http:
                # A registration whose load the replica refuses (the stubs read /loras/ only).
                async with http.post(
                    serve.url + "/admin/adapters",
                    json={"name": "typo", "path": "/models/typo"},
                    headers={**admin, "X-Request-Id": "admin:3"},
                ) as resp:
                    assert resp.status == 400, await resp.text()
                # A reload that applies, then one of a bad file.
                async with http.post(
                    serve.url + "/admin/reload", headers={**admin, "X-Request-Id": "reload:4"}
                ) as resp:
                    assert resp.status == 200, await resp.text()
                path.write_text("base_model: [")
                async with http.post(
                    serve.url + "/admin/reload", headers={**admin, "X-Request-Id": "reload:5"}
                ) as resp:
                    assert resp.status == 400, await resp.text()
            lines = await _lines_until(
                serve,
                {
                    "load": "adapter lora-0 load on replica r0 ",
                    "refusal": "adapter lora-1 (/loras/lora-1) failed to load on replica r0 ",
                    "refused load": "adapter lora-1 load on replica r0 ",
                    "admin refusal": "adapter typo (/models/typo) failed to load on replica r0 ",
                    "reloaded": "config reloaded: ",
                    "rejected": "config reload rejected, keeping the running config: ",
                },
            )
    by_start = {
        "adapter lora-0 load on replica r0 ": "on-demand:1",
        "adapter lora-1 (/loras/lora-1) failed to load on replica r0 ": "refused:2",
        "adapter lora-1 load on replica r0 ": "refused:2",
        "adapter typo (/models/typo) failed to load on replica r0 ": "admin:3",
        "adapter typo load on replica r0 ": "admin:3",
        "config reloaded: ": "reload:4",
        "config reload rejected, keeping the running config: ": "reload:5",
    }
    for start, request_id in by_start.items():
        found = [line for line in lines if line["message"].startswith(start)]
        assert len(found) == 1, (start, [line["message"] for line in lines])
        assert found[0].get("request_id") == request_id, found[0]
    # The text is as before: the load line names the request and the load's own id.
    (load,) = [x for x in lines if x["message"].startswith("adapter lora-0 load on replica r0 ")]
    assert " for request on-demand:1 (X-Request-Id on-demand:1-" in load["message"], load
    assert load["level"] == "INFO" and load["logger"] == "loragate.backends.pool"
    (refusal,) = [x for x in lines if x["message"].startswith("adapter lora-1 (/loras/")]
    assert refusal["level"] == "WARNING", refusal
    assert "request refused:2" not in refusal["message"]  # its text names the load's id only
    assert "X-Request-Id refused:2-" in refusal["message"], refusal
    (rejected,) = [x for x in lines if x["message"].startswith("config reload rejected")]
    assert rejected["message"].endswith(" (POST /admin/reload, request reload:5)"), rejected
    # Every line that names one of the requests carries that request's id.
    for request_id in ("on-demand:1", "refused:2", "admin:3", "reload:4", "reload:5"):
        about = _about(lines, request_id)
        assert about, request_id
        wrong = [x for x in about if x.get("request_id") != request_id]
        assert not wrong, (request_id, wrong)


async def test_the_no_replica_line_carries_the_id_of_the_request_it_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its text names the path and the model, not the request (the line stands for every 503
    of its minute); the JSON field names the one it was written for."""
    caplog.set_level(logging.WARNING, logger="loragate.gateway.route_errors")
    with socket.socket() as s:  # bind then close: nothing listens there, r0 is unhealthy
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = gateway_config([f"http://127.0.0.1:{port}"])
    async with running_gateway(config, port=0) as gw, openai_client(gw.url) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            await client.completions.create(
                model="lora-0", prompt="p", max_tokens=1, extra_headers={"X-Request-Id": "none:6"}
            )
        assert exc.value.status_code == 503
    (record,) = [r for r in caplog.records if r.getMessage().startswith("no replica available")]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "none:6", line
    assert line["message"].startswith(
        "no replica available: POST /v1/completions for model lora-0 answered 503 "
    ), line
