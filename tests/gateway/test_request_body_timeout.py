"""A client that stops sending its request body, or whose chunked framing breaks after the
gateway started reading it (aiohttp's C parser then never ends the body), gets an OpenAI-shaped
408 once ``limits.client_body_timeout_s`` passes without a byte, the connection is closed, and
the gateway keeps serving; nothing reaches a replica (real loopback sockets)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway import RunningGateway, running_gateway

_TIMEOUT_S = 0.3
_HEAD = b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"

# (head fields, body bytes sent at once, bytes sent after a pause or None to go silent)
CASES = {
    "stalls mid body (Content-Length)": (b"Content-Length: 100\r\n", b'{"prompt": "x', None),
    "stalls between chunks": (b"Transfer-Encoding: chunked\r\n", b'5\r\n{"pro\r\n', None),
    "bad chunk after reading began": (
        b"Transfer-Encoding: chunked\r\n",
        b'5\r\n{"pro\r\n',
        b"zz\r\nxx\r\n0\r\n\r\n",
    ),
}


async def _exchange(gw: RunningGateway, path: bytes, case: str, extra: bytes = b"") -> bytes:
    head, first, later = CASES[case]
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(_HEAD % path + extra + head + b"\r\n" + first)
        await writer.drain()
        if later is not None:
            await asyncio.sleep(0.05)  # the handler is reading the body by now
            writer.write(later)
            await writer.drain()
        # The answer, by its Content-Length (aiohttp keeps draining a stalled client's body for
        # up to 10 s before closing; the timeout only bounds a hang).
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await asyncio.wait_for(reader.readexactly(length), timeout=30)
    finally:
        writer.close()
        await writer.wait_closed()


def _parse(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)["error"]


async def _serving(gw: RunningGateway) -> None:
    url = gw.url + "/v1/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json={"prompt": "ok"}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_body_that_stops_arriving_is_a_408_and_the_gateway_keeps_serving(
    replicas: list[ScriptedReplica], case: str
) -> None:
    cfg = gateway_config([r.url for r in replicas], limits={"client_body_timeout_s": _TIMEOUT_S})
    async with running_gateway(cfg, port=0) as gw:
        status, headers, err = _parse(await _exchange(gw, b"/v1/completions", case))
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert headers["connection"].lower() == "close"
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["code"] == "request_timeout"
        assert f"{_TIMEOUT_S:g} s" in str(err["message"])
        await _serving(gw)
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
            assert 'loragate_requests_total{adapter="",replica="",status="408"} 1.0' in (
                await resp.text()
            )
    assert [b["prompt"] for r in replicas for b in r.requests] == ["ok"]


async def test_the_admin_api_times_out_a_stalled_body_too(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        limits={"client_body_timeout_s": _TIMEOUT_S},
        admin={"token": "secret"},
    )
    async with running_gateway(cfg, port=0) as gw:
        answer = await _exchange(
            gw,
            b"/admin/adapters",
            "stalls mid body (Content-Length)",
            b"Authorization: Bearer secret\r\n",
        )
        status, headers, err = _parse(answer)
        assert status == 408 and err["code"] == "request_timeout"
        assert headers["connection"].lower() == "close"
        await _serving(gw)


async def test_a_body_sent_slowly_but_steadily_is_not_cut_off(
    replicas: list[ScriptedReplica],
) -> None:
    """The timeout is for silence, not for the whole body: pauses shorter than it, adding up
    to more than it, are fine."""
    cfg = gateway_config(
        [r.url for r in replicas], limits={"client_body_timeout_s": _TIMEOUT_S * 2}
    )
    body = json.dumps({"prompt": "slow and steady", "max_tokens": 2}).encode()
    pieces = [body[i : i + 4] for i in range(0, len(body), 4)]
    async with running_gateway(cfg, port=0) as gw:
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(_HEAD % b"/v1/completions" + b"Content-Length: %d\r\n\r\n" % len(body))
        for piece in pieces:
            await asyncio.sleep(_TIMEOUT_S / 3)
            writer.write(piece)
            await writer.drain()
        assert len(pieces) * _TIMEOUT_S / 3 > _TIMEOUT_S * 2  # longer than one timeout
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"200"
    assert [b["prompt"] for r in replicas for b in r.requests] == ["slow and steady"]


@pytest.mark.parametrize("value", [0, -1, "soon", None])
def test_a_bad_client_body_timeout_fails_at_load_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "base_model": "m",
                "replicas": [{"id": "r0", "url": "http://127.0.0.1:1"}],
                "limits": {"client_body_timeout_s": value},
            }
        )
    assert "limits.client_body_timeout_s" in str(info.value)
