"""Request bodies with a ``Content-Encoding``: one that does not decode gets its 400 and one
DEBUG line naming the request, no ERROR with aiohttp's tracebacks (raw loopback sockets)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib

import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import RunningGateway, running_gateway


async def _exchange(gw: RunningGateway, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` and read until the server closes the connection (the timeout only
    bounds a hang)."""
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


def _post(path: str, body: bytes, encoding: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
async def test_a_body_that_does_not_decode_is_a_400_logged_at_debug_with_its_request_id(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture, path: str, encoding: str
) -> None:
    async with running_gateway(gateway_config([r.url for r in replicas]), port=0) as gw:
        with caplog.at_level(logging.DEBUG):
            status, headers, body = await _exchange(
                gw, _post(path, b'{"prompt": "not compressed"}', encoding)
            )
    assert status == 400, body
    err = json.loads(body)["error"]
    assert err["message"].startswith("the request body cannot be read")
    assert headers["connection"] == "close"
    request_id = headers["x-request-id"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
    lines = [r for r in caplog.records if "its body could not be read" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert f"request {request_id} from" in lines[0].getMessage()
    assert lines[0].exc_info is None
    assert not [b for r in replicas for b in r.requests]


@pytest.mark.parametrize(
    "encoding",
    ["br", "zstd", "foo", "gzip, gzip", "compress", "gzip\r\nContent-Encoding: gzip"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
async def test_an_unsupported_content_encoding_is_a_415_naming_the_supported_ones(
    replicas: list[ScriptedReplica], path: str, encoding: str
) -> None:
    async with running_gateway(gateway_config([r.url for r in replicas]), port=0) as gw:
        raw = _post(path, b'{"prompt": "p", "model": "m"}', encoding)
        raw = raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        status, headers, body = await _exchange(gw, raw)
    assert status == 415, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "unsupported_content_encoding"
    assert "supported: identity, gzip, deflate" in err["message"]
    assert "install" not in err["message"]
    assert headers["accept-encoding"] == "identity, gzip, deflate"
    assert headers["x-request-id"]
    assert not [b for r in replicas for b in r.requests]


# "": an empty header is an empty list of codings (RFC 9110 section 5.6.1): none, as aiohttp
# reads it (it was a 415 for a while).
@pytest.mark.parametrize("encoding", ["identity", "GZIP", "deflate", "", " "])
async def test_the_supported_encodings_are_served(
    replicas: list[ScriptedReplica], encoding: str
) -> None:
    plain = b'{"prompt": "encoded", "max_tokens": 2}'
    body = {
        "identity": plain,
        "GZIP": gzip.compress(plain),
        "deflate": zlib.compress(plain),
        "": plain,
        " ": plain,
    }
    async with running_gateway(gateway_config([r.url for r in replicas]), port=0) as gw:
        raw = _post("/v1/completions", body[encoding], encoding)
        raw = raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        status, _, answer = await _exchange(gw, raw)
    assert status == 200, answer
    assert [b["prompt"] for r in replicas for b in r.requests] == ["encoded"]
