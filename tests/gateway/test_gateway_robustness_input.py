"""Bad input at the front door: every malformed request gets a clear OpenAI-shaped error with
the right status, nothing reaches a replica, and the gateway keeps serving (real sockets)."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

JSON = {"Content-Type": "application/json"}  # vLLM serves JSON bodies only


async def _expect_error(resp: aiohttp.ClientResponse, status: int) -> dict[str, object]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


_DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    ("routing", "body", "param"),
    [
        # What vLLM's pydantic models refuse too (lax mode: see tests/twin/test_vllm_fields.py),
        # refused with vLLM's answer (test_vllm_validation.py): request validation names the
        # field's location ("Bad Request"), vLLM's own checks the parameter ("BadRequestError").
        ("round_robin", b'{"prompt": "p", "max_tokens": "16.5"}', "body.max_tokens"),
        ("round_robin", b'{"prompt": "p", "max_tokens": -3}', "max_tokens"),
        ("round_robin", b'{"prompt": "p", "max_tokens": 16.5}', "body.max_tokens"),
        ("round_robin", b'{"prompt": "p", "max_tokens": false}', "max_tokens"),
        ("round_robin", b'{"prompt": "p", "max_tokens": NaN}', "body.max_tokens"),
        ("round_robin", b'{"prompt": "p", "max_tokens": [16]}', "body.max_tokens"),
        ("round_robin", b'{"prompt": "p", "stream": 2}', "body.stream"),
        ("round_robin", b'{"prompt": "p", "stream": "maybe"}', "body.stream"),
        ("round_robin", b'{"prompt": "p", "stream": null, "model": []}', "body.model"),
        ("round_robin", b'{"prompt": 7}', "body.prompt"),
        ("round_robin", _DEEP, None),
        ("loragate", _DEEP, None),
    ],
)
async def test_malformed_fields_are_400(
    replicas: list[ScriptedReplica], routing: str, body: bytes, param: str | None
) -> None:
    cfg = gateway_config([r.url for r in replicas], routing=routing)
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", data=body, headers=JSON) as resp:
            err = await _expect_error(resp, 400)
            err_type = "BadRequestError" if param == "max_tokens" else "Bad Request"
            assert (err["type"], err["param"], err["code"]) == (err_type, param, 400)
        async with http.post(gw.url + "/v1/completions", json={"prompt": "ok"}) as resp:
            assert resp.status == 200
    assert [b["prompt"] for r in replicas for b in r.requests] == ["ok"]


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/completions", b'"max_tokens": 5.0'),
        ("/v1/completions", b'"max_tokens": "5"'),
        ("/v1/completions", b'"max_tokens": true'),
        ("/v1/completions", b'"max_tokens": 1e3'),
        ("/v1/chat/completions", b'"max_completion_tokens": 3.0'),
        ("/v1/chat/completions", b'"max_tokens": " 3 "'),
        ("/v1/completions", b'"stream": "false"'),
        ("/v1/completions", b'"stream": 0'),
    ],
)
async def test_integers_and_booleans_vllm_reads_leniently_are_served(
    replicas: list[ScriptedReplica], path: str, fields: bytes
) -> None:
    # vLLM 0.32's request models are pydantic models in lax mode: it serves these.
    body = b'{"prompt": "p", "messages": [{"role": "user", "content": "hi"}], ' + fields + b"}"
    cfg = gateway_config([replicas[0].url])
    async with (
        running_gateway(cfg, port=0) as gw,
        aiohttp.ClientSession() as http,
        http.post(gw.url + path, data=body, headers=JSON) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"]
    (sent,) = replicas[0].requests
    assert sent == json.loads(body)  # forwarded as the client wrote it


@pytest.mark.parametrize("stream", [b"1", b'"true"', b'"yes"', b'"on"', b"1.0"])
async def test_a_stream_flag_vllm_reads_as_true_is_relayed_as_a_stream(
    replicas: list[ScriptedReplica], stream: bytes
) -> None:
    rep = replicas[0]
    rep.stream_gate = asyncio.Event()  # the replica holds its stream after the first event
    body = b'{"prompt": "p", "max_tokens": 3, "stream": ' + stream + b"}"
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/v1/completions", data=body, headers=JSON) as resp,
    ):
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        # The first event arrives while the replica still holds the rest: relayed, not
        # buffered (a buffered answer would wait for the gate).
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=30)
        assert b'" one"' in first
        rep.stream_gate.set()
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("routing", ["round_robin", "least_loaded", "loragate", "lora_affinity"])
@pytest.mark.parametrize("max_tokens", [10**400, 10**300, 2**63])
async def test_huge_max_tokens_reaches_the_replica_and_the_gateway_keeps_serving(
    replicas: list[ScriptedReplica], routing: str, max_tokens: int
) -> None:
    cfg = gateway_config([r.url for r in replicas], routing=routing)
    body = b'{"model": "lora-0", "prompt": "p", "max_tokens": ' + str(max_tokens).encode() + b"}"
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(gw.url + "/v1/completions", data=body, headers=JSON) as resp:
                assert resp.status == 200, await resp.text()
        for _ in range(4):
            async with http.post(gw.url + "/v1/completions", json={"prompt": "ok"}) as resp:
                assert resp.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/completions", 405, "POST"),
        ("PUT", "/v1/chat/completions", 405, "POST"),
        ("POST", "/v1/models", 405, "GET,HEAD"),
        ("DELETE", "/health", 405, "GET,HEAD"),
        ("POST", "/v1/embeddings", 404, None),
        ("GET", "/" + "x" * 4000, 404, None),
    ],
)
async def test_unknown_paths_and_methods_get_openai_shaped_errors(
    replicas: list[ScriptedReplica], method: str, path: str, status: int, allow: str | None
) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.request(method, gw.url + path, json={"prompt": "p"}) as resp:
            err = await _expect_error(resp, status)
            assert err["type"] == "invalid_request_error"
            assert resp.headers.get("Allow") == allow
        async with http.post(gw.url + "/v1/completions", json={"prompt": "ok"}) as resp:
            assert resp.status == 200
    assert [b["prompt"] for r in replicas for b in r.requests] == ["ok"]


async def test_compressed_bodies(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas], limits={"max_body_bytes": 100_000})
    gzip_ok = gzip.compress(b'{"prompt": "zipped", "max_tokens": 2}')
    bomb = gzip.compress(b'{"prompt": "' + b"x" * 1_000_000 + b'"}')  # ~1 KB -> 1 MB
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        url = gw.url + "/v1/completions"
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        async with http.post(url, data=b"not gzip at all", headers=headers) as resp:
            err = await _expect_error(resp, 400)
            # One line, without aiohttp's "400, message:" framing.
            assert err["message"] == (
                "the request body cannot be read: Can not decode content-encoding: gzip"
            )
        async with http.post(url, data=bomb, headers=headers) as resp:
            await _expect_error(resp, 413)
        async with http.post(url, data=gzip_ok, headers=headers) as resp:
            assert resp.status == 200
        async with http.post(url, json={"prompt": "ok"}) as resp:
            assert resp.status == 200
    assert [b["prompt"] for r in replicas for b in r.requests] == ["zipped", "ok"]


async def test_unknown_fields_pass_through_unchanged_and_only_json_is_served(
    replicas: list[ScriptedReplica],
) -> None:
    """vLLM 0.32 serves completions and chat bodies sent as application/json only (its
    validate_json_request): another type, or none, is its 400 "Unsupported Media Type", which
    the gateway answers as vLLM would (b90a622) instead of forwarding the body as JSON."""
    cfg = gateway_config([replicas[0].url])
    body = {
        "model": "lora-1",
        "prompt": ["a", "b"],
        "max_tokens": 3,
        "ignore_eos": True,
        "vendor_extension": {"nested": [1, 2.5, None, "é"]},
        "stream": False,
    }
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        data = json.dumps(body).encode()
        async with http.post(gw.url + "/v1/completions", data=data, headers=JSON) as r:
            assert r.status == 200
        for content_type in ("text/plain", None):
            headers = {"Content-Type": content_type} if content_type else {}
            async with http.post(gw.url + "/v1/completions", data=data, headers=headers) as r:
                err = await _expect_error(r, 400)
                assert "Unsupported Media Type" in err["message"]
    assert replicas[0].requests == [body]


@pytest.mark.parametrize("size", [999, 1000, 1001, 5000])
async def test_chunked_body_arriving_whole_is_held_to_the_limit(
    replicas: list[ScriptedReplica], size: int
) -> None:
    # A chunked request (no Content-Length) written in one piece: the gateway has all of it
    # before it reads it, and must still refuse it if it is over the limit.
    cfg = gateway_config([r.url for r in replicas], limits={"max_body_bytes": 1000})
    body = b'{"prompt": "' + b"x" * (size - 14) + b'"}'
    assert len(body) == size
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    async with running_gateway(cfg, port=0) as gw:
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked
        )
        answer = await reader.read()
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    payload = answer.partition(b"\r\n\r\n")[2]
    if len(body) > 1000:
        assert status == 413, answer
        assert b'"request_too_large"' in payload
        assert not [b for r in replicas for b in r.requests]
    else:
        assert status == 200, answer
        assert [len(b["prompt"]) for r in replicas for b in r.requests] == [size - 14]
