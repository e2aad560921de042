"""The gateway answers a bad request itself only when vLLM's answer to it is surely the one it
gives; otherwise the request goes to a replica, whose answer is vLLM's. Checked against the
simulated replica (``loragate.twin``, vLLM 0.32's checks in vLLM's order) over loopback: each
body is sent to the replica directly and through the gateway, and the answers must match.

* The ``Content-Type`` (vLLM's ``validate_json_request``) comes first: anything but
  ``application/json`` is refused, an empty body too, except that a body FastAPI decodes first
  (``+json``) has its JSON errors answered first. The gateway sends every body upstream as
  ``application/json``, so it must make this check itself.
* ``max_tokens`` below 1 is vLLM's answer only once ``n``, the prompt's length in tokens and
  every other sampling field passed: the gateway answers it only on a completions body of the
  fields it reads with a prompt that is short for the replicas' ``max_model_len``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from gateway_harness import gateway_config

from loragate.gateway import running_gateway
from loragate.gateway.proxy import REPLICA_HEADER
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

BASE = "tiny-llama"
JSON = "application/json"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def replica() -> AsyncIterator[RunningReplica]:
    cfg = ReplicaConfig(served_model_name=BASE, max_model_len=64, time_scale=100.0)
    async with run_replica(cfg, port=0) as rep:
        yield rep


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, content_type: str | None
) -> tuple[int, object, bool]:
    """(status, error or None, whether a replica answered it) of one request."""
    headers = {"Content-Type": content_type} if content_type else {}
    skip = () if content_type else ("Content-Type",)
    async with http.post(url, data=body, headers=headers, skip_auto_headers=skip) as resp:
        answer = await resp.json(content_type=None)
        return resp.status, answer.get("error"), REPLICA_HEADER in resp.headers


def _body(payload: object) -> bytes:
    return json.dumps(payload).encode()


# (path, Content-Type, body, whether the replica is the one to answer)
CASES = [
    # max_tokens below 1 after vLLM's earlier checks: n, the prompt's length (64 here).
    (COMPLETIONS, JSON, _body({"prompt": "p", "max_tokens": 0, "n": 0}), True),
    (COMPLETIONS, JSON, _body({"prompt": "word " * 80, "max_tokens": 0}), True),
    (COMPLETIONS, JSON, _body({"prompt": "p", "max_tokens": 0, "min_tokens": 5}), True),
    (COMPLETIONS, JSON, _body({"prompt": "é", "max_tokens": 0}), True),  # not ASCII: unsure
    (CHAT, JSON, _body({"messages": HI, "max_tokens": 0}), True),  # a chat template: unsure
    # ...and where it is surely vLLM's first answer: the gateway's own.
    (COMPLETIONS, JSON, _body({"prompt": "p", "max_tokens": 0}), False),
    (COMPLETIONS, JSON, _body({"prompt": [1, 2, 3], "max_tokens": -1, "stream": True}), False),
    (COMPLETIONS, JSON, _body({"model": BASE, "prompt": "p", "max_tokens": False}), False),
    # The media type, ahead of the body's own errors.
    (COMPLETIONS, "text/plain", _body({"prompt": "p", "max_tokens": 0}), False),
    (CHAT, "text/plain", _body({"messages": HI}), False),
    (COMPLETIONS, None, _body({"prompt": "p"}), False),
    (COMPLETIONS, "application/octet-stream", b"", False),
    (COMPLETIONS, "application/json ; x=y", _body({"prompt": "p"}), False),
    (COMPLETIONS, "application/vnd.api+json", _body({"prompt": "p"}), False),
    (COMPLETIONS, "application/vnd.api+json", b'{"prompt": ', False),  # FastAPI's JSON error
    (CHAT, "application/json ; x=y", b"{not json", False),
    (CHAT, "application/json-seq", b"{not json", False),
]


async def test_the_gateway_answers_what_the_replica_would_in_vllms_order(
    replica: RunningReplica,
) -> None:
    cfg = gateway_config([replica.url])
    problems: list[str] = []
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for path, ctype, body, upstream in CASES:
            direct_status, direct_error, _ = await _post(http, replica.url + path, body, ctype)
            status, error, forwarded = await _post(http, gw.url + path, body, ctype)
            if (status, error) != (direct_status, direct_error) or forwarded != upstream:
                problems.append(
                    f"{path} {ctype} {body[:40]!r}: gateway {status} {error} "
                    f"(replica answered: {forwarded}); replica {direct_status} {direct_error}"
                )
            assert status == 400, (path, ctype, body[:40], error)
        # A JSON media type with parameters, in any case, is served.
        ok = _body({"prompt": "p", "max_tokens": 1})
        status, error, forwarded = await _post(
            http, gw.url + COMPLETIONS, ok, "Application/JSON; charset=utf-8"
        )
        assert (status, error, forwarded) == (200, None, True)
    assert not problems, "\n".join(problems)


async def test_without_a_known_max_model_len_the_replica_answers() -> None:
    # The gateway bounds the prompt's length by the replicas' /v1/models max_model_len: with no
    # replica polled yet (none is reachable) it cannot, and does not answer max_tokens itself.
    async with contextlib.AsyncExitStack() as stack:
        cfg = gateway_config(["http://127.0.0.1:9"])  # nothing listens on the discard port
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        status, error, _ = await _post(
            http, gw.url + COMPLETIONS, _body({"prompt": "p", "max_tokens": 0}), JSON
        )
        assert status == 503 and isinstance(error, dict)
