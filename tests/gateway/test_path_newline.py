"""Paths with an encoded newline (``%0a``) get the gateway's own OpenAI-shaped answers, with an
``X-Request-Id`` and counted, like any other path (raw loopback sockets): the route patterns
match every character, not ``.`` (which does not match a newline)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import RunningGateway, running_gateway

TOKEN = "admin-secret"


async def _exchange(
    gw: RunningGateway, method: str, path: str
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            .encode()
        )  # fmt: skip
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)  # (bounds a hang only)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


async def _endpoint_errors(gw: RunningGateway) -> float:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("loragate_endpoint_errors_total{")
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/x%0ay", 404),
        ("POST", "/v1/completions%0a", 404),
        ("GET", "/v1/models%0A", 404),
        ("GET", "/admin/x%0ay", 404),
        ("DELETE", "/admin/adapters/x%0ay", 404),
        ("GET", "/admin/replicas/r0%0a", 404),
    ],
)
async def test_a_path_with_an_encoded_newline_gets_an_openai_error_with_a_request_id(
    replicas: list[ScriptedReplica], method: str, path: str, status: int
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw:
        answered, headers, body = await _exchange(gw, method, path)
        assert answered == status, body
        assert headers["content-type"].startswith("application/json")
        assert headers.get("x-request-id")
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert await _endpoint_errors(gw) == 1.0
    assert not [b for r in replicas for b in r.requests]
