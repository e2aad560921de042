"""``Expect: 100-continue``: a request refused before its body is read (401, 413) gets the
refusal instead of ``100 Continue``, with ``Connection: close``; the others get ``100
Continue`` and are served; a 413 always says ``Connection: close`` (raw loopback sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import RunningGateway, running_gateway

KEY = "sk-acme"
BIG = 5_000_000  # over the default limits.max_body_bytes (4 MiB)


@pytest.fixture
async def gateway(replicas: list[ScriptedReplica]) -> AsyncIterator[RunningGateway]:
    cfg = gateway_config([r.url for r in replicas], tenants=[{"name": "acme", "api_keys": [KEY]}])
    async with running_gateway(cfg, port=0) as gw:
        yield gw


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)  # (bounds a hang)
    status_line, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers


async def _answer(reader: asyncio.StreamReader) -> tuple[list[int], dict[str, str], bytes]:
    """The statuses received (interim ones first), the final answer's headers and body."""
    statuses: list[int] = []
    while True:
        status, headers = await _head(reader)
        statuses.append(status)
        if status != 100:
            break
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return statuses, headers, body


def _request(
    path: str,
    length: int,
    *,
    auth: bool,
    expect: str | None = "100-continue",
    encoding: str | None = None,
) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {length}\r\n"
    if encoding is not None:
        head += f"Content-Encoding: {encoding}\r\n"
    if auth:
        head += f"Authorization: Bearer {KEY}\r\n"
    if expect is not None:
        head += f"Expect: {expect}\r\n"
    return (head + "\r\n").encode()


@pytest.mark.parametrize(
    ("path", "length", "auth", "status"),
    [
        ("/v1/completions", BIG, False, 401),
        ("/v1/completions", 20, False, 401),
        ("/v1/chat/completions", BIG, True, 413),
        ("/tokenize", BIG, False, 401),
        ("/tokenize", BIG, True, 413),
    ],
)
async def test_a_request_refused_before_its_body_gets_the_refusal_instead_of_100(
    gateway: RunningGateway,
    replicas: list[ScriptedReplica],
    path: str,
    length: int,
    auth: bool,
    status: int,
) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(_request(path, length, auth=auth))
        statuses, headers, body = await _answer(reader)
    finally:
        writer.close()
    assert statuses == [status]  # no 100 Continue first
    assert headers["connection"] == "close"
    assert headers["x-request-id"]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert not [b for r in replicas for b in r.requests]


@pytest.mark.parametrize(
    ("path", "encoding"),
    [("/v1/completions", "compress"), ("/tokenize", "gzip, gzip"), ("/v1/completions", "x")],
)
async def test_an_unsupported_content_encoding_gets_the_415_instead_of_100(
    gateway: RunningGateway, replicas: list[ScriptedReplica], path: str, encoding: str
) -> None:
    """Before, the gateway sent 100 Continue, took the body, then answered 415."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(_request(path, 20, auth=True, encoding=encoding))
        statuses, headers, body = await _answer(reader)
    finally:
        writer.close()
    assert statuses == [415], body  # no 100 Continue first
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "unsupported_content_encoding"
    assert not [b for r in replicas for b in r.requests]


async def test_an_accepted_request_gets_100_continue_then_its_answer(
    gateway: RunningGateway, replicas: list[ScriptedReplica]
) -> None:
    body = b'{"prompt": "continued", "max_tokens": 2}'
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(_request("/v1/completions", len(body), auth=True))
        assert (await _head(reader))[0] == 100  # before the body is sent
        writer.write(body)
        statuses, _, answer = await _answer(reader)
    finally:
        writer.close()
    assert statuses == [200], answer
    assert [b["prompt"] for r in replicas for b in r.requests] == ["continued"]


async def test_an_unknown_expectation_is_a_417_in_the_openai_shape(
    gateway: RunningGateway,
) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(_request("/v1/completions", 2, auth=True, expect="teapot") + b"{}")
        statuses, headers, body = await _answer(reader)
    finally:
        writer.close()
    assert statuses == [417] and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "expectation_failed"


async def test_a_413_without_expect_says_connection_close(gateway: RunningGateway) -> None:
    """The body is not read: the client must not reuse the connection (nor go on sending)."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(_request("/v1/completions", BIG, auth=True, expect=None) + b"{")
        statuses, headers, _ = await _answer(reader)
    finally:
        writer.close()
    assert statuses == [413] and headers["connection"] == "close"
