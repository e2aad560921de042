"""A request can be traced from the client to the gateway's log and the replica: its
``X-Request-Id`` (the client's when it is 1-128 printable ASCII characters without spaces,
else generated, unique across gateway instances) is in every answer's headers (successes and
every error the gateway gives), in the log lines about the request, and sent to the replica as
``<id>-<try>`` (a client's id gets the gateway's own between: clients may reuse theirs). In-process
gateways over loopback, scripted replicas, the openai SDK as client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving_replicas,
)

from loragate.gateway import running_gateway

PROXY_LOG = "loragate.gateway.proxy"
TENANTS = [{"name": "acme", "api_keys": ["sk-acme"]}]
HEADER = "x-request-id"


class IdReplica(ScriptedReplica):
    """A scripted replica that records the ``X-Request-Id`` of each completion it is sent."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ids: list[str | None] = []

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.ids.append(request.headers.get("X-Request-Id"))
        return await super()._answer(request)


@pytest.fixture
async def id_replicas() -> AsyncIterator[list[IdReplica]]:
    async with serving_replicas(IdReplica) as out:
        yield out


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROXY_LOG]


async def test_generated_ids_are_returned_logged_and_sent_upstream(
    id_replicas: list[IdReplica], caplog: pytest.LogCaptureFixture
) -> None:
    r0, _ = id_replicas
    cfg = gateway_config([r0.url], tenants=TENANTS)
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    seen: list[str] = []
    for _ in range(2):  # two gateway instances (as two pods would be)
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, "sk-acme") as c:
            raw = await c.completions.with_raw_response.create(model=BASE, prompt="p", max_tokens=1)
            seen.append(raw.headers[HEADER])
            streamed = await c.chat.completions.with_raw_response.create(
                model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            _ = [e async for e in streamed.parse()]
            seen.append(streamed.headers[HEADER])
    assert len(set(seen)) == 4, seen  # unique, across instances too
    assert r0.ids == [f"{rid}-1" for rid in seen]
    for rid in seen:
        assert rid.isascii() and rid.isprintable() and " " not in rid and len(rid) <= 128
        assert any(m.startswith(f"request {rid} /v1/") for m in _lines(caplog)), rid


async def test_a_clients_id_is_echoed_and_sent_upstream_without_collisions(
    id_replicas: list[IdReplica], caplog: pytest.LogCaptureFixture
) -> None:
    r0, _ = id_replicas
    cfg = gateway_config([r0.url], tenants=TENANTS)
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    mine = {"X-Request-Id": "trace-0af3:abc/42"}
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, "sk-acme") as c:
        for _ in range(2):  # the client reuses its id
            raw = await c.completions.with_raw_response.create(
                model=BASE, prompt="p", max_tokens=1, extra_headers=mine
            )
            assert raw.headers[HEADER] == "trace-0af3:abc/42"
    first, second = r0.ids
    assert first is not None and second is not None and first != second
    assert first.startswith("trace-0af3:abc/42-") and first.endswith("-1")
    assert second.startswith("trace-0af3:abc/42-") and second.endswith("-1")
    logged = [m for m in _lines(caplog) if m.startswith("request trace-0af3:abc/42 /v1/")]
    assert len(logged) == 2, _lines(caplog)


@pytest.mark.parametrize(
    "given",
    ["has spaces in it", "x" * 129, "tab\tinside", ""],
    ids=["space", "long", "tab", "empty"],
)
async def test_an_unsafe_client_id_is_replaced(
    id_replicas: list[IdReplica], caplog: pytest.LogCaptureFixture, given: str
) -> None:
    r0, _ = id_replicas
    cfg = gateway_config([r0.url], tenants=TENANTS)
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, "sk-acme") as c:
        raw = await c.completions.with_raw_response.create(
            model=BASE, prompt="p", max_tokens=1, extra_headers={"X-Request-Id": given}
        )
    rid = raw.headers[HEADER]
    assert rid != given and rid and " " not in rid and "\t" not in rid
    assert r0.ids == [f"{rid}-1"]
    assert not any(given in m for m in _lines(caplog) if given), _lines(caplog)
    assert any(m.startswith(f"request {rid} /v1/") for m in _lines(caplog))


async def test_every_error_answer_carries_the_id(id_replicas: list[IdReplica]) -> None:
    r0, _ = id_replicas
    cfg = gateway_config([r0.url], tenants=TENANTS)
    async with running_gateway(cfg, port=0) as gw:
        async with openai_client(gw.url, "wrong") as c:
            with pytest.raises(openai.AuthenticationError) as auth:
                await c.completions.create(model=BASE, prompt="p", max_tokens=1)
        async with openai_client(gw.url, "sk-acme") as c:
            with pytest.raises(openai.NotFoundError) as unknown:
                await c.completions.create(model="no-such-model", prompt="p", max_tokens=1)
            with pytest.raises(openai.BadRequestError) as bad:
                await c.completions.create(
                    model=BASE, prompt="p", extra_body={"max_tokens": "many"}
                )
            r0.mode = "drop"  # no other replica: a 502 naming r0, then r0 is out: a 503
            with pytest.raises(openai.APIStatusError) as dropped:
                await c.completions.create(
                    model=BASE, prompt="p", max_tokens=1, extra_headers={"X-Request-Id": "t-7"}
                )
            with pytest.raises(openai.APIStatusError) as unserved:
                await c.completions.create(model=BASE, prompt="p", max_tokens=1, stream=True)
    errors = [auth.value, unknown.value, bad.value, dropped.value, unserved.value]
    assert [e.status_code for e in errors] == [401, 404, 400, 502, 503]
    ids = [e.request_id for e in errors]  # (the SDK reads x-request-id)
    assert all(ids) and len(set(ids)) == len(ids), ids
    assert dropped.value.request_id == "t-7"
    assert dropped.value.response.headers["x-loragate-replica"] == "r0"
    assert r0.ids[-1].startswith("t-7-") and r0.ids[-1].endswith("-1")  # type: ignore[union-attr]


async def test_a_retry_sends_its_own_try_id_and_the_warning_names_the_request(
    id_replicas: list[IdReplica], caplog: pytest.LogCaptureFixture
) -> None:
    r0, r1 = id_replicas
    r0.mode = "drop"  # the first try breaks; the retry goes to r1
    cfg = gateway_config([r.url for r in id_replicas], routing="round_robin", tenants=TENANTS)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, "sk-acme") as c:
        raw = await c.completions.with_raw_response.create(model=BASE, prompt="p", max_tokens=1)
    rid = raw.headers[HEADER]
    assert raw.headers["x-loragate-replica"] == "r1"
    assert r0.ids == [f"{rid}-1"] and r1.ids == [f"{rid}-2"]
    warned = [
        m for m in _lines(caplog) if m.startswith(f"request {rid} (model <base>) on replica r0")
    ]
    assert warned, _lines(caplog)
